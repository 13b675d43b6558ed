"""The conformance kit for tensor adapters: :func:`check_tensor_adapter` runs one through every check."""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ray_zerocopy.testing.kit import collect_checks, registered, same_bytes
from ray_zerocopy.testing.proof import tensors_outside_shared_memory

Example = Callable[[nn.Module], torch.Tensor]  # runs the model on a fixed input, returns one tensor


def _adapted(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The model's tensors that adapter ``name`` carries (the first adapter that handles a tensor wins)."""
    from ray_zerocopy.plugins import tensor_adapters

    adapters = tensor_adapters()
    found = {}
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        first = next((a for a in adapters if a.handles(t)), None)
        if first is not None and first.name == name:
            found[key] = t
    return found


class _NoTensors(pickle.Pickler):
    def persistent_id(self, obj: object) -> str | None:
        if isinstance(obj, torch.Tensor):
            raise TypeError(f"a tensor of shape {tuple(obj.shape)}")
        return "module" if isinstance(obj, nn.Module) else None  # (a reference into the skeleton, as bitsandbytes keeps)


def _check_flatten(adapter: Any, key: str, t: torch.Tensor) -> list[str]:
    """In the driver: flatten gives tensors and tensor-free metadata, and unflatten(flatten(t)) gives the same
    type with the same inner bytes."""
    try:
        inner, meta = adapter.flatten(t)
    except Exception as exc:
        return [f"{key}: flatten raised {type(exc).__name__}: {exc}"]
    problems = [f"{key}: flatten gave {k!r} = {type(v).__name__}, not a tensor" for k, v in inner.items()
                if not isinstance(v, torch.Tensor)]
    try:
        _NoTensors(io.BytesIO()).dump(meta)
    except Exception as exc:  # a tensor in the metadata would be pickled into every actor, not shared
        problems.append(f"{key}: metadata does not pickle without tensor data ({type(exc).__name__}: {exc}); "
                        "return tensors as inner tensors")
    if problems:
        return problems
    rebuilt = type(adapter).unflatten(dict(inner), meta)
    if type(rebuilt) is not type(t) or rebuilt.shape != t.shape or rebuilt.dtype != t.dtype:
        return [f"{key}: unflatten(flatten(t)) gave a {type(rebuilt).__name__} {tuple(rebuilt.shape)} {rebuilt.dtype}, "
                f"expected a {type(t).__name__} {tuple(t.shape)} {t.dtype}"]
    again = adapter.flatten(rebuilt)[0]
    return [f"{key}: inner tensor {k!r} differs after unflatten" for k in inner
            if k not in again or (type(inner[k]) in (torch.Tensor, nn.Parameter) and not same_bytes(inner[k], again[k]))]


def _kit_load(ref: Any, example: Example, expected: torch.Tensor, types: dict[str, str], plugin: object | None,
              zero_copy: bool) -> list[str]:
    from ray_zerocopy.errors import AdaptedDtypeError
    from ray_zerocopy.load import load_model_in_actor

    with registered(plugin):
        model = load_model_in_actor(ref)
        with torch.no_grad():
            got = example(model)
        problems = [] if same_bytes(got, expected) else ["output differs from the driver's model (not bit-for-bit)"]
        named = dict([*model.named_parameters(), *model.named_buffers()])
        problems += [f"tensor {k!r} came back as a {type(named.get(k)).__name__}, expected a {kind}"
                     for k, kind in types.items() if type(named.get(k)).__name__ != kind]
        if zero_copy and (away := tensors_outside_shared_memory(model)):
            problems.append(f"not views of shared memory: {away}")
        try:
            load_model_in_actor(ref, dtype=torch.float16)
            problems.append("dtype=torch.float16 loaded instead of raising AdaptedDtypeError")
        except AdaptedDtypeError:
            pass
    return problems


def check_tensor_adapter(
    name: str,
    model: nn.Module,
    example: Example,
    *,
    plugin: object | None = None,
    backends: Sequence[str] = ("object_store", "packed", "safetensors"),
    timeout_s: float = 300.0,
) -> list[str]:
    """Conformance check of the tensor adapter ``name`` on a model that holds tensors it carries.

    Checks, in the driver: the adapter is registered and is the one chosen for some of ``model``'s tensors;
    ``flatten`` gives tensors and metadata that pickles without tensor data; ``unflatten(flatten(t))`` gives the
    same type, shape and dtype, with the same inner bytes. Then, for each backend, in a Ray task: the loaded
    model's ``example`` output equals the driver's bit for bit; the adapted tensors keep their types; on the
    CPU every stored tensor is a view of shared memory (backends that claim ``zero_copy``); and ``dtype=`` at
    load raises ``AdaptedDtypeError``.

    Args:
        name: the registered adapter name.
        model: a model (on the CPU) with tensors the adapter carries.
        example: runs a model on a fixed input and returns one tensor (e.g. ``lambda m: m(ids).logits``).
        plugin: an object with a ``register_tensor_adapters`` hookimpl, registered in the driver and in each
            task while the check runs (to check an adapter that is not installed).
        backends: the transports to check it through.
        timeout_s: for the whole check; a task still running then counts as hung.

    Returns:
        The names of the checks that passed.

    Raises:
        AssertionError: one line per failed check.
        RuntimeError: Ray is not initialized.

    Example:
        >>> check_tensor_adapter("my_quant", model, lambda m: m(x))  # doctest: +SKIP
    """
    import ray

    from ray_zerocopy.plugins import get_backend, tensor_adapters
    from ray_zerocopy.prepare import prepare_model_for_actors

    if not ray.is_initialized():
        raise RuntimeError("check_tensor_adapter runs inside a running Ray: call ray.init() first")
    task = ray.remote(_kit_load).options(num_cpus=1, max_retries=0)
    with registered(plugin):
        adapter = next((a for a in tensor_adapters() if a.name == name), None)
        if adapter is None:
            raise AssertionError(f"no tensor adapter {name!r} is registered: {[a.name for a in tensor_adapters()]}")
        adapted = _adapted(model, name)
        if not adapted:
            raise AssertionError(f"adapter {name!r} is not chosen for any tensor of the model (another adapter "
                                 "handles them first, or its handles() returns False)")
        problems = [p for key, t in adapted.items() for p in _check_flatten(adapter, key, t)]
        with torch.no_grad():
            expected = example(model)
        types = {k: type(t).__name__ for k, t in adapted.items()}
        jobs = []
        for backend in backends:
            ref = prepare_model_for_actors(model, backend=backend)
            zero_copy = bool(get_backend(backend).zero_copy)
            jobs.append((f"load through {backend}", task.remote(ref, example, expected, types, plugin, zero_copy)))
        found, passed = collect_checks(jobs, timeout_s)
        problems += found
    if problems:
        raise AssertionError(f"tensor adapter {name!r} failed {len(problems)} conformance check(s):\n- "
                             + "\n- ".join(problems))
    return ["flatten and unflatten", *passed]
