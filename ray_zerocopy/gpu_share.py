"""``share_gpu``: a per-GPU holder of a model's one device copy, and the loads that map it and move onto it.
The per-GPU copier (opt-in) is in ``gpu_copier.py``; both are detached actors (``_detached.py``).

``load_model_in_actor(ref, device="cuda", share_gpu=True)``: the first actor on a physical GPU
starts a small holder actor for that model and GPU, which copies the weights from the object
store to the GPU once (through the fast host-to-device path) and exports CUDA IPC handles; every
actor on that GPU maps the holder's device memory (no copy, no new device memory) and rebuilds the
model around it (:func:`load_shared`, which ``load.py`` calls). An actor that loads while the holder
starts (seconds) does not wait: it loads a copy of its own, and moves onto the holder's copy once that
is up (:func:`wait_shared` waits for the move).

Lifetimes: the holder owns the device memory. It is detached (it survives the actor that
started it), on the same node, with no CPU or GPU reserved, and named after the model and the
GPU's UUID (``CUDA_VISIBLE_DEVICES`` differs from actor to actor, UUIDs do not). It counts the
models that map it, by process: a model that is collected, or a process that dies (checked
every half second), stops counting, and when none is left for ``LINGER_S`` seconds the holder
frees the memory and exits.

Updates (``update_model_in_actor``): a new version gets a copy of its own, from the holder of the new ref
(:func:`attached`: started by the first actor on the GPU that updates, mapped by the others); each model is
pointed at it and moves its count from the old holder to the new one (:func:`move_to`), so the old copy
is freed once no model maps it (at the holder's next check, without ``LINGER_S``). A copy is never
written to by an update: no call of another actor ever sees two versions.

Writes: device memory mapped through CUDA IPC cannot be made copy-on-write (as host memory is). Only
parameters are shared; buffers are private to each actor (models update them in their forward). A
write into a parameter is caught after the call by the version counters (``guard.py``); the holder
then restores the weights from the object store before
:class:`~ray_zerocopy.errors.SharedWeightWriteError` is raised.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Callable

import ray
import torch

from ray_zerocopy import _cuda
from ray_zerocopy._detached import Detached, start_detached
from ray_zerocopy._log import warn_once
from ray_zerocopy._tensors import cast_floating, laid, rebuild_model, weight_kinds
from ray_zerocopy.backend import dtype_name
from ray_zerocopy.guard import guard_model

LINGER_S = 2.0  # an unused holder waits this long for a new user before it frees the GPU memory
ATTACH_TRIES = 3  # a holder that just exited (no users) is replaced by a new one
READY_WAIT_S = 0.02  # how long a load waits for an existing holder or copier to answer before it goes on alone
# (a fresh actor's first call to one that is up takes milliseconds)


def gpu_uuid(device: torch.device) -> str:
    """``GPU-<uuid>`` of a CUDA device of this process (what ``CUDA_VISIBLE_DEVICES`` accepts)."""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


@ray.remote(num_cpus=0, num_gpus=0, max_restarts=0)
class _Holder(Detached):
    """Holds one model's weights on one GPU and hands out CUDA IPC handles to them."""

    def __init__(self, uuid: str, model_ref: Any, dtype: torch.dtype | None) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = uuid  # before CUDA starts here: this GPU is cuda:0
        from ray_zerocopy.plugins import get_backend

        self.backend, self.ref, self.dtype = get_backend(model_ref.backend), model_ref, dtype
        self.tensors: dict[str, torch.Tensor] | None = self._fetch()  # None once freed (no users left)
        torch.cuda.synchronize()
        storages: dict[int, int] = {}
        self.shared: list[tuple] = []  # one IPC handle per device storage
        self.specs: dict[str, tuple] = {}  # name -> (storage index, offset, shape, stride, dtype)
        for name, t in self.tensors.items():
            s = t.untyped_storage()
            if s.data_ptr() not in storages:
                storages[s.data_ptr()] = len(self.shared)
                self.shared.append(s._share_cuda_())
            self.specs[name] = (storages[s.data_ptr()], t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        self.users: dict[int, int] = {}  # pid -> models of that process that map this memory
        self.idle_since = time.monotonic()
        self.lock = threading.Lock()
        self._watch_every(0.5)

    def _fetch(self) -> dict[str, torch.Tensor]:
        tensors = self.backend.get(self.ref.payload, torch.device("cuda", 0))
        return cast_floating(tensors, self.dtype) if self.dtype is not None else tensors

    def attach(self, pid: int) -> tuple[list[tuple], dict[str, tuple]]:
        """Count one more model of process ``pid`` as a user; the IPC handles and the tensor layout."""
        with self.lock:
            if self.tensors is None:
                raise RuntimeError("holder is shutting down")
            self.users[pid] = self.users.get(pid, 0) + 1
        return self.shared, self.specs

    def release(self, pid: int, linger: bool = True) -> None:
        """One model of process ``pid`` no longer maps this copy. ``linger=False`` (it moved to a newer version):
        with no user left, the copy is freed at the next check instead of after ``LINGER_S``."""
        with self.lock:
            self.users[pid] = self.users.get(pid, 0) - 1
            if self.users[pid] <= 0:
                del self.users[pid]
            if not self.users:
                self.idle_since = time.monotonic() - (0.0 if linger else LINGER_S)

    def restore(self) -> None:
        """Put back the stored weights after a user wrote into them (copied again from the object store)."""
        fresh = self._fetch()
        assert self.tensors is not None  # (a restore comes from a user: the memory is freed only when none is left)
        for name, t in self.tensors.items():
            t.copy_(fresh[name])
        torch.cuda.synchronize()

    def _let_go(self) -> bool:
        with self.lock:
            alive = {pid: n for pid, n in self.users.items() if _alive(pid)}
            if alive != self.users:
                self.users = alive
                self.idle_since = time.monotonic()
            if self.users or time.monotonic() - self.idle_since < LINGER_S:
                return False
            self.tensors = None  # no user for LINGER_S: give the memory back, then go
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _holder(model_ref: Any, uuid: str, dtype: torch.dtype | None) -> tuple[Any, bool]:
    name = f"rzc-{model_ref.uid}-{uuid}-{dtype_name(dtype) if dtype is not None else None}"
    return start_detached(_Holder, name, uuid, model_ref, dtype)


class Attach:
    """A model's attachment to the holder of its weights on one GPU: asked for at once (starting the holder
    if there is none), answered once the holder has copied the weights to the GPU."""

    def __init__(self, model_ref: Any, device: torch.device, dtype: torch.dtype | None) -> None:
        self.device, self.args = device, (model_ref, gpu_uuid(device), dtype)
        self.moved = False  # (set when a model that loaded its own copy first moved onto the holder's)
        self._ask()

    def _ask(self) -> None:
        self.holder, self.new = _holder(*self.args)
        self.answer = self.holder.attach.remote(os.getpid())  # (counts this process as a user once answered)

    def ready(self, timeout: float) -> bool:
        """Whether the holder has answered within ``timeout`` seconds (at once False for one started now)."""
        return bool(ray.wait([self.answer], timeout=0 if self.new else timeout)[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Device tensors by name that map the holder's copy (waits for it). Raises on any failure."""
        for attempt in range(ATTACH_TRIES):
            try:
                shared, specs = ray.get(self.answer)
                break
            except (ray.exceptions.RayActorError, RuntimeError):  # it was exiting: start another
                if attempt == ATTACH_TRIES - 1:
                    raise
                time.sleep(0.5)
                self._ask()
        with torch.cuda.device(self.device):
            # (an empty storage has no IPC handle: _share_cuda_ gives None, which _new_shared_cuda refuses; a
            # backend that copies tensor by tensor gives an empty tensor one, e.g. object_store)
            storages = [torch.UntypedStorage._new_shared_cuda(self.device.index, *h[1:]) if h[1] is not None
                        else torch.UntypedStorage(0, device=self.device) for h in shared]
            return {name: torch.empty(0, dtype=dt, device=self.device).set_(storages[i], offset, shape, stride)
                    for name, (i, offset, shape, stride, dt) in specs.items()}


def release(holder: Any, pid: int, linger: bool = True) -> None:
    """Called when a model that maps a holder's memory is collected (its tensors are gone), or has moved to
    another version's holder (``linger=False``: see :meth:`_Holder.release`)."""
    try:
        holder.release.remote(pid, linger)
    except Exception:  # Ray already shut down: the holder sees the process go
        pass


_held: weakref.WeakKeyDictionary[torch.nn.Module, weakref.finalize] = weakref.WeakKeyDictionary()


def hold(model: torch.nn.Module, holder: Any) -> None:
    """Count ``model`` as a user of ``holder``'s copy (it attached to it) until the model is collected, or
    until :func:`move_to` another holder's copy."""
    _held[model] = weakref.finalize(model, release, holder, os.getpid())


def move_to(model: torch.nn.Module, holder: Any) -> None:
    """``model`` maps ``holder``'s copy now (a live update, after it attached to it), no longer the copy of the
    holder it was held by: that one is let go at once (freed at its next check where no other model maps it)."""
    previous = _held.pop(model, None)
    hold(model, holder)
    detached = previous.detach() if previous is not None else None  # (None: it already ran, or never held)
    if detached is not None:
        _, _, (previous_holder, pid), _ = detached
        release(previous_holder, pid, linger=False)


def load_shared(model_ref: Any, dev: torch.device, fetch: Callable[[], dict[str, torch.Tensor]], *,
                dtype: torch.dtype | None, as_parameters: bool) -> torch.nn.Module | None:
    """The model around the device copy shared by every actor on ``dev``'s GPU; None (and one log
    line) where it cannot be shared, so the caller loads a private copy. ``fetch`` gives the backend's
    tensors of ``model_ref`` on ``dev`` (cast to ``dtype``): a copy of this model's own.

    Where the holder is not up yet (it starts in seconds), the model gets a copy of its own at once and
    moves onto the holder's when the holder answers (same bytes; the copy is then freed)."""
    if dev.type != "cuda":
        warn_once(f"share_gpu=True has no effect on {dev} (CPU weights are shared host memory anyway)")
        return None
    try:
        attach = Attach(model_ref, dev, dtype)
        with torch.inference_mode(False):
            tensors = attach.tensors() if attach.ready(READY_WAIT_S) else None
    except Exception as exc:  # no CUDA IPC, holder failed to start, ...
        warn_once(f"share_gpu: cannot share the device copy ({type(exc).__name__}: {exc}); loading a private copy")
        return None
    mapped = tensors is not None
    if tensors is None:
        _cuda.warm_ring(dev)
        tensors = fetch()
    tensors, params = _private_buffers(model_ref, tensors)  # (an own copy's parameters are freed on the move)
    placed: list = []
    model = rebuild_model(model_ref.skeleton, tensors, model_ref.layouts, as_parameters=as_parameters, placed=placed)
    shared = [(name, t) for name, t in placed if name in params]
    if mapped:
        hold(model, attach.holder)
        return guard_model(model, shared, restore=lambda: ray.get(attach.holder.restore.remote()))
    versions = [t._version for _, t in shared]  # (a tensor written before the move is not compared)
    mover = threading.Thread(target=_move_onto_holder, daemon=True,
                             args=(weakref.ref(model), attach, shared, versions, model_ref.layouts))
    mover.start()
    _moving[model] = mover

    def restore() -> None:
        mover.join()
        if attach.moved:  # (a write before the move changed the own copy, which the move replaced)
            ray.get(attach.holder.restore.remote())
        else:  # still on its own copy: the stored bytes go back into it
            fresh = fetch()
            for name, t in shared:
                t.data.copy_(laid(fresh[name], name, model_ref.layouts))

    return guard_model(model, shared, restore=restore)


_moving: weakref.WeakKeyDictionary[torch.nn.Module, threading.Thread] = weakref.WeakKeyDictionary()


def wait_shared(model: torch.nn.Module, timeout: float | None = None) -> bool:
    """Wait until a model loaded with ``share_gpu=True`` maps the GPU's shared copy (a first load may
    start on a copy of its own, see :func:`load_shared`); False if it does not within ``timeout``."""
    mover = _moving.get(model)
    if mover is not None:
        mover.join(timeout)
    return mover is None or not mover.is_alive()


def _move_onto_holder(model: weakref.ref, attach: Attach, shared: list[tuple[str, torch.Tensor]], versions: list[int],
                      layouts: dict) -> None:
    """Point ``shared`` (a model's parameters, on a copy of its own) at the holder's copy once it answers,
    where that holds the same bytes as every tensor not written since ``versions`` (else the model keeps
    its own copy, and one log line says so)."""
    try:
        with torch.inference_mode(False):
            holder = attach.tensors()
            mapped = {name: laid(holder[name], name, layouts) for name, _ in shared}
            same = all(_same_bytes(t, mapped[name]) for (name, t), v in zip(shared, versions) if t._version == v)
    except Exception as exc:
        warn_once(f"share_gpu: the holder did not start ({type(exc).__name__}: {exc}); the model keeps its own copy")
        return
    alive = model()
    if alive is None or not same:
        if alive is not None:
            warn_once("share_gpu: the holder's copy differs from this model's own copy; the model keeps its own")
        release(attach.holder, os.getpid())
        return
    own = [t.data for _, t in shared]
    for name, t in shared:
        t.data = mapped[name]  # (the same bytes; the Parameter object and its version counter stay)
    for name, p in alive.named_parameters():  # a Parameter subclass stored by an adapter as its bytes under
        if f"{name}:data" in mapped:          # "data" (bitsandbytes) is a tensor object of its own: move it too
            p.data = mapped[f"{name}:data"]
    torch.cuda.synchronize(attach.device)  # work queued on the model's own copy ends before it is freed
    del own
    torch.cuda.empty_cache()  # (else the freed copy stays reserved by this process's allocator)
    attach.moved = True
    hold(alive, attach.holder)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and torch.equal(
        a.detach().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _private_buffers(model_ref: Any, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``tensors`` with every buffer cloned, and the names of the parameters: buffers are private to each actor
    (models update them: LongRoPE's inv_freq, running statistics); the shared parameters are watched."""
    params = {name for name, is_param in weight_kinds(model_ref.skeleton) if is_param}
    return {k: t if k in params else t.clone() for k, t in tensors.items()}, params


def attached(model_ref: Any, device: torch.device, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], Any]:
    """Device tensors by name that map the copy of ``model_ref`` shared on ``device``'s GPU, and its holder:
    the holder is started if there is none (the first process to ask starts it, the others get the same
    one), and waited for. The holder counts this process as one more user: let it go with :func:`release`,
    or :func:`hold` / :func:`move_to` the model built on the tensors.

    Raises:
        Exception: whatever kept the holder from starting or answering (the GPU has no room for the copy,
            no CUDA IPC, ...); nothing is counted then.
    """
    attach = Attach(model_ref, device, dtype)
    try:
        with torch.inference_mode(False):
            return attach.tensors(), attach.holder
    except BaseException:
        if _answered(attach):  # (counted, then mapping failed here)
            release(attach.holder, os.getpid())
        raise


def shared_version(model_ref: Any, device: torch.device, dtype: torch.dtype | None,
                   as_parameters: bool) -> tuple[torch.nn.Module, Any]:
    """A new version of a model loaded with ``share_gpu=True``, for a live update: the model built around the
    copy of ``model_ref`` shared on ``device``'s GPU (:func:`attached`; its buffers are private clones, as after
    a load), and that copy's holder, which counts this process as a user (:func:`move_to` the live model once
    it maps the copy, else :func:`release`)."""
    tensors, holder = attached(model_ref, device, dtype)
    try:
        tensors, _ = _private_buffers(model_ref, tensors)
        return rebuild_model(model_ref.skeleton, tensors, model_ref.layouts, as_parameters=as_parameters), holder
    except BaseException:
        release(holder, os.getpid())
        raise


def _answered(attach: Attach) -> bool:
    try:
        ray.get(attach.answer, timeout=0)
    except Exception:
        return False
    return True
