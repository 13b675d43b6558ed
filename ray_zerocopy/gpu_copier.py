"""Per-GPU copier of a model (opt-in): fills actors' device memory from pinned pages of Ray's store.

The copier (``RAY_ZEROCOPY_H2D_ROUTE=copier`` in the actors' environment): the first load of a model on
a GPU starts a small detached actor for that model and GPU, and copies through the pinned ring itself
(``_cuda.py``). The copier holds the model's objects in Ray's store and pins their pages once
(``cudaHostRegister``); from then on a load of that model on that GPU allocates its device memory and
has the copier fill it through CUDA IPC: one DMA from pinned pages, so the actor pays no pinning, no
first touches of the store's pages and no host copy. The load looks the copier up while it fetches
the payload and builds the model while the DMA runs (``_cuda.copy_to_device(wait=False)``). First loads
get much closer to the pinned peak than through the ring (docs/benchmarks.md has the figures); but a
load made while its copier starts copies alone, and it costs a process with a CUDA context per model and
GPU. Hence opt-in. It holds the objects for ``COPIER_LINGER_S`` after its last copy
(``$RAY_ZEROCOPY_COPIER_LINGER_S``), then unpins them and exits.
``prepare_model_for_actors(..., gpu_copiers=True)`` opts a model in from the driver instead: it starts the
model's copier on every GPU of every node with GPUs (:func:`start_copiers`) and returns once they are up,
so they serve first loads too. Each exits once ``PRESTART_WAIT_S`` pass with no copy (a pool's actors
arrive over minutes: restarts, autoscaling; a copier that left 10 s after its last copy was gone when a
fresh actor came 30 s later, which then copied alone at a third of the speed), or once the weights are gone (:func:`weights_lost`:
the process that prepared the model ended). Every copier asks its owner each second.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import ray
import torch
from ray.experimental import get_object_locations
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_zerocopy import _cuda
from ray_zerocopy._detached import NAMESPACE, Detached, start_detached
from ray_zerocopy._env import env_number
from ray_zerocopy._log import warn_once
from ray_zerocopy._shm import vma_of
from ray_zerocopy.gpu_share import READY_WAIT_S, gpu_uuid
from ray_zerocopy.model_ref import object_refs

COPIER_LINGER_S = env_number("RAY_ZEROCOPY_COPIER_LINGER_S", 10.0)  # then it frees the objects
RING_GBPS = 20e9  # about what a first load through the ring reaches: a gpu_copiers load waits for its copier that long
COPIER_START_S = 120.0  # prepare waits this long for a copier to be up
PRESTART_WAIT_S = env_number("RAY_ZEROCOPY_COPIER_WAIT_S", 300.0)  # a started-ahead copier's idle limit
_PAGE = 4096  # (host pages: what cudaHostRegister pins)


@ray.remote(num_cpus=0, num_gpus=0, max_restarts=0)
class _Copier(Detached):
    """Copies ranges of one model's objects, pinned in its memory, into device memory of actors on one GPU."""

    def __init__(self, uuid: str, model_ref: Any) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = uuid  # before CUDA starts here: this GPU is cuda:0
        torch.zeros(1, device="cuda")  # (the CUDA context that pins and copies)
        self.refs = list(object_refs(model_ref.payload))
        self.held: Any = ray.get(self.refs)  # keeps the objects in the store
        self.ranges = store_ranges(self.held)
        for i, (_, lo, hi, addr) in enumerate(self.ranges):
            try:
                _cuda.pin_host(addr, hi - lo)
            except _cuda.PinError as exc:  # (then every load copies by itself: copy() answers False)
                warn_once(f"the copier cannot pin the model's objects ({exc}); loads on this GPU copy by themselves")
                for _, _, _, done in self.ranges[:i]:
                    _cuda.unpin_host(done)
                self.ranges = []
                break
        # it exits once idle_s pass with no copy: a gpu_copiers model's copier waits for the pool's later actors
        self.copies, self.idle_s = 0, PRESTART_WAIT_S if model_ref.gpu_copiers else COPIER_LINGER_S
        self.last = time.monotonic()
        self.lock = threading.Lock()  # a copy and the unpinning never overlap
        self._watch_every(1.0)

    def ready(self) -> int:
        """How many loads it has filled (an answer means it is up)."""
        return self.copies

    def copy(self, handle: tuple, file: tuple[int, int, int], offset: int, nbytes: int) -> bool:
        """Fill the device memory behind ``handle`` (``_share_cuda_()`` of an actor's storage) with the
        ``nbytes`` at ``offset`` of the store's ``file`` (device, inode); False where they are not pinned here."""
        with self.lock:
            self.last = time.monotonic()
            if self.held is None:  # (unpinned: it is exiting)
                return False
            for key, lo, hi, addr in self.ranges:
                if key == file and lo <= offset and offset + nbytes <= hi:
                    src = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr + offset - lo), dtype=torch.uint8)
                    storage = torch.UntypedStorage._new_shared_cuda(0, *handle[1:])
                    dst = torch.empty(0, dtype=torch.uint8, device="cuda").set_(storage, 0, (nbytes,), (1,))
                    dst.copy_(src, non_blocking=True)  # (a pinned source: one DMA)
                    torch.cuda.synchronize()
                    self.copies += 1
                    return True
        return False

    def _let_go(self) -> bool:
        lost = weights_lost(self.refs)  # (the job that prepared the model ended: no load will come)
        with self.lock:
            if not lost and time.monotonic() - self.last < self.idle_s:
                return False
            for _, _, _, addr in self.ranges:
                _cuda.unpin_host(addr)
            self.held = None  # (the objects may go now)
        return True


def weights_lost(refs: list[Any]) -> bool:
    """True once the objects' owner is gone (the driver that prepared them ended, or the owner actor of
    ``node=``). A copier then exits at once instead of holding them until it is idle. It asks the owner
    where the objects are: a ``ray.get`` here would not tell, the copier holds them in the store (a local
    hit, also after the owner died: such a copier outlived its preparer)."""
    for _ in range(2):  # (two failed lookups a second apart: not a one-off RPC failure)
        try:
            if get_object_locations(refs[:1], timeout_ms=10_000):
                return False
        except ray.exceptions.GetTimeoutError:  # (a busy owner)
            return False
        time.sleep(1.0)  # (the lookup failed: the owner did not answer)
    return True


def store_ranges(objects: Any) -> list[tuple[tuple[int, int, int], int, int, int]]:
    """Where the buffers in ``objects`` (what ``ray.get`` returned: numpy arrays, Ray's buffers, dicts and
    lists of them) lie in Ray's store, as page-aligned ``(file, file offset, file end, address here)``, neighbours
    merged (buffers outside the store, e.g. small inlined objects, are left out)."""
    spans = []
    todo = [objects]
    while todo:
        obj = todo.pop()
        if isinstance(obj, dict):
            todo += obj.values()
        elif isinstance(obj, (list, tuple)):
            todo += obj
        elif not isinstance(obj, (str, bytes)):
            try:
                view = np.frombuffer(obj, dtype=np.uint8)  # (numpy arrays, Ray's buffers: any contiguous buffer)
            except (TypeError, ValueError):
                continue
            vma = vma_of(view.ctypes.data) if view.nbytes else None
            if vma is not None and vma.target:
                lo = view.ctypes.data // _PAGE * _PAGE
                hi = -(-(view.ctypes.data + view.nbytes) // _PAGE) * _PAGE
                spans.append((vma.file[:3], vma.offset(lo), vma.offset(hi), lo))
    merged: list[list] = []
    for key, lo, hi, addr in sorted(spans):
        last = merged[-1] if merged else None
        if last and last[0] == key and lo <= last[2] and last[3] - last[1] == addr - lo:  # (one mapping)
            last[2] = max(last[2], hi)
        else:
            merged.append([key, lo, hi, addr])
    return [(key, lo, hi, addr) for key, lo, hi, addr in merged]


def copier_source(model_ref: Any, device: torch.device) -> Any:
    """What ``_cuda.copy_source`` takes for a load of ``model_ref`` on ``device`` (None where the route
    does not use copiers): a function that has this GPU's copier of the model fill a device buffer. Used with
    the copier route, or for a model prepared with ``gpu_copiers=True`` unless the route is set to staged or
    plain. The copier is looked up in a thread while the load fetches the payload (a fresh actor's first
    lookup and call take milliseconds); the load copies by itself where there is none ready (one is
    started if there is none), and a load of a ``gpu_copiers`` model waits for one that is still starting
    about as long as copying alone would take (``RING_GBPS``)."""
    route = _cuda.current_route()
    if route != "copier" and not (route == "auto" and model_ref.gpu_copiers):
        return None
    wait_s = max(READY_WAIT_S, model_ref.nbytes / RING_GBPS if route == "auto" else 0.0)
    lookup = _lookups.submit(_ready_copier, model_ref, device, gpu_uuid(device), wait_s)

    def fill(buf: torch.Tensor, dst: torch.Tensor) -> Callable[[], bool] | None:
        copier = lookup.result()
        return None if copier is None else _copy_via(copier, buf, dst)

    return fill


_lookups = ThreadPoolExecutor(thread_name_prefix="rzc-copier-lookup")  # (a threaded actor may load several at once)


def _ready_copier(model_ref: Any, device: torch.device, uuid: str, wait_s: float) -> Any:
    """This GPU's copier of the model once it answers within ``wait_s``; else None, and the load's own
    staging ring starts pinning (a copier is started where there is none, for the loads that follow)."""
    copier, new = _copier(model_ref, uuid)
    try:
        if not new:
            probe: Any = copier.ready.remote()
            if ray.wait([probe], timeout=wait_s)[0]:
                ray.get(probe)
                return copier
    except Exception:  # it is exiting (a new one starts with a later load)
        pass
    _cuda.warm_ring(device)
    return None


def start_copiers(model_ref: Any) -> int:
    """Start ``model_ref``'s copier on every GPU of every alive node that has GPUs (one task per node lists
    its GPUs' UUIDs with ``nvidia-smi`` and starts them there); returns once they are up (they pinned the
    weights), with how many are. A fresh actor's first load then finds its copier ready (with prepare
    returning at once, the first fresh actor loaded before its copier was up, through the slower ring)."""
    tasks = [_start_copiers_here.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(model_ref)
        for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0]
    return sum(ray.get(tasks))


@ray.remote(num_cpus=0)
def _start_copiers_here(model_ref: Any) -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        warn_once(f"cannot list this node's GPUs for the copiers ({exc}); the first loads here start them")
        return 0
    uuids = [line.strip() for line in out.splitlines() if line.strip().startswith("GPU-")]
    copiers = [_copier(model_ref, uuid)[0] for uuid in uuids]
    up = 0
    for uuid, copier in zip(uuids, copiers):
        try:
            ray.get(copier.ready.remote(), timeout=COPIER_START_S)
            up += 1
        except ray.exceptions.RayError as exc:  # (a load on that GPU starts another, or copies alone)
            warn_once(f"the copier on {uuid} did not come up in {COPIER_START_S:.0f} s ({type(exc).__name__}: {exc})")
    return up


def stop_copiers() -> int:
    """End every model's copier now (each otherwise holds its model's objects until it has been idle for
    ``COPIER_LINGER_S``, or ``PRESTART_WAIT_S`` if started by prepare): the benchmark calls this between
    approaches. Returns the loads they filled."""
    filled = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and actor["name"].startswith("copier-"):
            try:
                copier = ray.get_actor(actor["name"], namespace=NAMESPACE)
            except ValueError:  # it exited meanwhile
                continue
            try:
                probe: Any = copier.ready.remote()
                filled += ray.get(probe, timeout=30)
            except ray.exceptions.RayError:  # it is exiting, or never came up
                pass
            ray.kill(copier)
    return filled


def _copy_via(copier: Any, buf: torch.Tensor, dst: torch.Tensor) -> Callable[[], bool] | None:
    """Ask ``copier`` to fill ``dst`` from ``buf``; returns what waits for its answer (None: it cannot)."""
    vma = vma_of(buf.data_ptr())
    if vma is None or not vma.target:
        return None
    offset = vma.offset(buf.data_ptr())
    try:
        filled = copier.copy.remote(dst.untyped_storage()._share_cuda_(), vma.file[:3], offset, buf.numel())
    except Exception as exc:  # no CUDA IPC for this memory, ...
        _cannot_fill(exc)
        return None

    def done() -> bool:
        try:
            return ray.get(filled)
        except Exception as exc:  # it exited meanwhile, CUDA IPC failed, ...
            _cannot_fill(exc)
            return False

    return done


def _cannot_fill(exc: Exception) -> None:
    warn_once(f"the node's copier could not fill this load ({type(exc).__name__}: {exc}); copying here")


def _copier(model_ref: Any, uuid: str) -> tuple[Any, bool]:
    return start_detached(_Copier, f"copier-{model_ref.uid}-{uuid}", uuid, model_ref)
