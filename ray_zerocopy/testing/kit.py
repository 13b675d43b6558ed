"""The conformance kit: :func:`check_backend` runs a backend through every check, in Ray tasks."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ray_zerocopy._shm import STORE_MARKER
from ray_zerocopy._stream import ALIGN
from ray_zerocopy.testing.proof import outside, unique_tensors
from ray_zerocopy.testing.zoo import zoo_input, zoo_model

KIT_MODELS = ("hard_cases", "bert", "gpt2")
# Payloads no backend can read: each must make get() raise (not return, crash or hang).
GENERIC_BAD_PAYLOADS: tuple[object, ...] = (None, "not a payload", 42, {"weights": b"\0" * 8}, ())
_KIT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


def dtype_zoo(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor per dtype every transport must carry, with random bit patterns (NaNs included)
    and odd element counts (a careless layout then misaligns the next tensor), plus a 2-D tensor,
    a scalar and an empty tensor. Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(_KIT_DTYPES):
        n = 2 * i + 3
        if dtype == torch.bool:
            out["bool"] = torch.randint(0, 2, (n,), generator=g).bool()
        else:
            out[str(dtype).removeprefix("torch.")] = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8,
                                                                   generator=g).view(dtype)
    out["matrix"] = torch.randn(3, 5, generator=g)
    out["scalar"] = torch.tensor(1.5, dtype=torch.float64)
    out["empty"] = torch.empty(0, 7)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _all_named(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


def _ties(named: dict[str, torch.Tensor]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, t in named.items():
        groups.setdefault(id(t), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


@contextlib.contextmanager
def registered(plugin: object | None) -> Iterator[None]:
    """Register ``plugin`` in this process while the block runs (for a backend not installed)."""
    from ray_zerocopy import plugins

    if plugin is None or plugins.plugin_manager().is_registered(plugin):
        yield
        return
    name = f"ray_zerocopy.testing.check_backend:{id(plugin)}"
    plugins.register_plugin(plugin, name=name)
    try:
        yield
    finally:  # plugins.py has no unregister: undo by hand so the kit leaves the registry as it found it
        plugins.plugin_manager().unregister(name=name)
        with plugins._lock:
            plugins._backends = plugins._adapters = None
            plugins._instances.clear()


def _marker(backend: object) -> str:
    """Substring of the /proc/self/maps path that zero-copy views must lie in (``Backend.shared_memory_marker``)."""
    return getattr(backend, "shared_memory_marker", STORE_MARKER)  # a backend built on an older Backend lacks it


def _put_untouched(name: str) -> tuple[object, list[str]]:
    """``put`` of :func:`dtype_zoo` in this process: the payload, and how ``put`` changed its input (it
    must leave the caller's tensors and mapping as they were: they are the user's model)."""
    from ray_zerocopy.plugins import get_backend

    given, expected = dtype_zoo(), dtype_zoo()
    before = {k: (t, t.data_ptr(), t.stride()) for k, t in given.items()}
    payload = get_backend(name).put(given)
    if list(given) != list(before):
        return payload, [f"put() changed the names of its input mapping: {sorted(given)}"]
    return payload, [f"put() changed its input tensor {k!r} (replaced, moved, restrided or written)"
                     for k, (t, ptr, stride) in before.items()
                     if given[k] is not t or (t.data_ptr(), t.stride()) != (ptr, stride) or not same_bytes(t, expected[k])]


def _misaligned(tensors: dict[str, torch.Tensor]) -> list[str]:
    """A problem line for tensors not 64-byte aligned as the driver's are: CPU kernels round differently
    for operands at other alignments (a model's outputs then differ from the driver's in the last bits)."""
    odd = sorted(f"{k!r} at {t.data_ptr() % ALIGN} mod {ALIGN}" for k, t in tensors.items()
                 if t.numel() and t.data_ptr() % ALIGN)
    return [f"{len(odd)} tensor(s) not {ALIGN}-byte aligned ({', '.join(odd[:5])}): outputs may differ "
            f"from the driver's; place each tensor at a multiple of {ALIGN} bytes of a {ALIGN}-byte aligned buffer"
            ] if odd else []


def _check_tensors(name: str, payload: object, device: str) -> list[str]:
    from ray_zerocopy.plugins import get_backend

    backend, expected = get_backend(name), dtype_zoo()
    with torch.inference_mode(False):
        got = backend.get(payload, torch.device(device))
    if set(got) != set(expected):
        return [f"get() returned names {sorted(got)}, expected {sorted(expected)}"]
    problems = [f"tensor {k!r} ({t.dtype}, {tuple(t.shape)}) came back as {got[k].dtype}, "
                f"{tuple(got[k].shape)} on {got[k].device} with other bytes"
                for k, t in expected.items() if not same_bytes(got[k], t) or got[k].device.type != device.split(":")[0]]
    if device == "cpu" and backend.zero_copy and (away := outside(got, _marker(backend))):
        problems.append(f"zero_copy=True, but {away} are not views of shared memory ({_marker(backend)!r})")
    return problems + _misaligned(got)


def _check_model(name: str, model_name: str, ref: Any, device: str) -> list[str]:
    from ray_zerocopy.load import load_model_in_actor
    from ray_zerocopy.plugins import get_backend

    original, ids = zoo_model(model_name).to(device), zoo_input().to(device)
    loaded = load_model_in_actor(ref, device=device)
    with torch.no_grad():  # both evaluated here, on one device: same kernels, same rounding
        expected, got = original(ids).cpu(), loaded(ids).cpu()
    problems = [] if same_bytes(got, expected) else ["output differs from the original model's (not bit-for-bit)"]
    want, have = _all_named(original), _all_named(loaded)
    if set(want) != set(have):
        problems.append(f"tensor names differ: missing {sorted(set(want) - set(have))}, extra {sorted(set(have) - set(want))}")
    problems += [f"tensor {k!r} differs (dtype, shape, strides or bytes)" for k in sorted(set(want) & set(have))
                 if not same_bytes(want[k], have[k]) or (device == "cpu" and want[k].stride() != have[k].stride())]
    if _ties(want) != _ties(have):
        problems.append(f"tied weights not restored as one object: expected {_ties(want)}, got {_ties(have)}")
    if loaded.training or any(p.requires_grad for p in loaded.parameters()):
        problems.append("loaded model is in train mode or has requires_grad=True parameters")
    backend = get_backend(name)
    if device == "cpu" and backend.zero_copy and (away := outside(dict(unique_tensors(loaded)), _marker(backend))):
        problems.append(f"zero_copy=True, but {away} are not views of shared memory ({_marker(backend)!r})")
    problems += _misaligned(dict(unique_tensors(loaded)))
    return [f"{model_name}: {p}" for p in problems]


def _check_bad(name: str, payload: object) -> list[str]:
    from ray_zerocopy.plugins import get_backend

    try:
        out = get_backend(name).get(payload, torch.device("cpu"))
    except Exception:  # any typed error is fine; crashes and hangs are caught by the caller
        return []
    return [f"get() returned a {type(out).__name__} instead of raising"]


def _kit_task(check: str, name: str, plugin: object | None, args: tuple, device: str) -> list[str]:
    with registered(plugin):
        if check == "tensors":
            return _check_tensors(name, args[0], device)
        if check == "model":
            model_name, ref = args
            return _check_model(name, model_name, ref, device)
        return _check_bad(name, args[0])


def check_backend(
    name: str,
    *,
    plugin: object | None = None,
    models: tuple[str, ...] = KIT_MODELS,
    device: str = "cpu",
    bad_payloads: Callable[[object], list[object]] | None = None,
    timeout_s: float = 300.0,
) -> list[str]:
    """Conformance check of the transport ``name``, run in Ray tasks of the running Ray.

    Checks: ``put`` leaves its input untouched; every dtype round-trips bit for bit; each zoo model loads in a task with outputs
    equal bit for bit to the original evaluated in the same worker, every tensor equal, ties
    kept as one object, eval mode, no grad; on the CPU, if the backend claims ``zero_copy``,
    every tensor is a view of shared memory (mappings whose path contains the backend's
    ``shared_memory_marker``: Ray's object store unless it says otherwise); every non-empty tensor
    ``get`` returns is 64-byte aligned, as the driver's are (CPU kernels round differently for
    misaligned operands, so outputs would differ in the last bits); bad payloads make ``get`` raise, never return,
    crash the worker or hang.

    Args:
        name: the registered backend name.
        plugin: an object with a ``register_backends`` hookimpl, registered in the driver and in
            each task while the check runs (to check a backend that is not installed).
        models: zoo models to round-trip (see :data:`ZOO`).
        device: ``"cpu"``, or ``"cuda"`` to load on a GPU (tasks then ask Ray for one).
        bad_payloads: given a valid payload (of :func:`dtype_zoo`), returns corrupted payloads that
            ``get`` must reject; the generic ones (:data:`GENERIC_BAD_PAYLOADS`) always run.
        timeout_s: for the whole check; a task still running then counts as hung.

    Returns:
        The names of the checks that passed.

    Raises:
        AssertionError: one line per failed check.
        RuntimeError: Ray is not initialized.

    Example:
        >>> ray.init(); check_backend("my_backend")  # doctest: +SKIP
    """
    import ray

    from ray_zerocopy.errors import UnknownBackendError
    from ray_zerocopy.plugins import get_backend
    from ray_zerocopy.prepare import prepare_model_for_actors

    if not ray.is_initialized():
        raise RuntimeError("check_backend runs inside a running Ray: call ray.init() first")
    task = ray.remote(_kit_task).options(num_cpus=1, num_gpus=0 if device == "cpu" else 1, max_retries=0)
    with registered(plugin):
        try:
            backend = get_backend(name)
        except UnknownBackendError as exc:
            raise AssertionError(str(exc)) from None
        payload, put_problems = _put_untouched(name)
        jobs = [("dtype round trip", task.remote("tensors", name, plugin, (payload,), device))]
        for model_name in models:
            ref = prepare_model_for_actors(zoo_model(model_name), backend=name)
            jobs.append((f"model {model_name}", task.remote("model", name, plugin, (model_name, ref), device)))
        for bad in [*GENERIC_BAD_PAYLOADS, *(bad_payloads(payload) if bad_payloads else [])]:
            jobs.append((f"bad payload {bad!r:.80}", task.remote("bad", name, plugin, (bad,), "cpu")))
        problems, passed = collect_checks(jobs, timeout_s)
        problems[:0] = put_problems
    if backend.name != name or not isinstance(backend.zero_copy, bool) or type(backend.format_version) is not int:
        problems.insert(0, f"class attributes: name={backend.name!r} (registered as {name!r}), zero_copy="
                        f"{backend.zero_copy!r} (must be bool), format_version={backend.format_version!r} (int)")
    if problems:
        raise AssertionError(f"backend {name!r} failed {len(problems)} conformance check(s):\n- " + "\n- ".join(problems))
    return passed


def collect_checks(jobs: Sequence[tuple[str, Any]], timeout_s: float) -> tuple[list[str], list[str]]:
    """Wait for every check task; a timeout, a dead worker or an error in the task is a failure."""
    import time

    import ray

    deadline, problems, passed = time.monotonic() + timeout_s, [], []
    for label, ref in jobs:
        try:
            found = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            found = [f"did not finish within {timeout_s:.0f} s (a hang?)"]
        except ray.exceptions.WorkerCrashedError:
            found = ["crashed the worker process"]
        except ray.exceptions.RayTaskError as exc:
            found = [f"raised {type(exc.cause).__name__}: {str(exc.cause)[:300]}"]
        problems += [f"{label}: {p}" for p in found]
        passed += [] if found else [label]
    return problems, passed
