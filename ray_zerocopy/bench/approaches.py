"""The loading approaches the benchmark compares (see :mod:`ray_zerocopy.bench.cli`; its models: ``models.py``).

Every approach is two plain functions: ``prepare`` runs once in the driver and returns a
small handle (ObjectRefs nested inside it are not resolved by Ray when the handle is passed
to an actor method inside a list), ``load`` runs in an actor and returns a usable model.
The alternatives are written here from their public descriptions, the way a user would:
plain ``ray.put(model)``, Ray's ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` flag (same code as
``ray.put``, run by a driver started with the flag), the classic numpy recipe of the earlier
loaders, and state-dict files read from disk in each actor.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import ray
import torch

from ray_zerocopy._tensors import view_key
from ray_zerocopy.bench.models import ModelSpec, build_model

# ---------------------------------------------------------------- state-dict files


def all_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name, non-persistent buffers included
    (a state dict drops those, and a meta skeleton would keep them on meta)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: t.detach() for name, t in named}


def dedupe_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(first name -> contiguous tensor, alias -> first name): what a format without sharing can store
    (a quantized tensor: the plain tensors it is stored as)."""
    from ray_zerocopy._tensors import flat_tensors
    from ray_zerocopy.plugins import tensor_adapters

    adapters = tensor_adapters()
    first: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    flat = [pair for outer, tensor in all_tensors(model).items() for pair in flat_tensors(outer, tensor, adapters)]
    for name, t in flat:
        key = view_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            unique[name] = t.contiguous()
    return unique, aliases


def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Put ``tensors`` into a (meta) skeleton by dotted name; tensors viewing the same bytes become
    one object again, so tied weights stay tied. Raises ``KeyError`` naming a missing tensor."""
    made: dict[tuple, Any] = {}  # tie key -> the Parameter or buffer put in the model
    named = [(n, True) for n, _ in model.named_parameters(remove_duplicate=False)]
    named += [(n, False) for n, _ in model.named_buffers(remove_duplicate=False)]
    for name, is_param in named:
        t = tensors[aliases.get(name, name)]
        key = (*view_key(t), is_param)
        if key not in made:
            made[key] = torch.nn.Parameter(t, requires_grad=False) if is_param else t
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        (module._parameters if is_param else module._buffers)[leaf] = made[key]


def load_torch_file(spec: ModelSpec, path: str, mmap: bool) -> torch.nn.Module:
    """Meta skeleton + ``torch.load`` of the tensors file (weights only) + assign."""
    model = build_model(spec, meta=True)
    assign_tensors(model, torch.load(path, mmap=mmap, weights_only=True), {})
    return model


# ---------------------------------------------------------------- approaches


@dataclass
class Prepared:
    """What an approach's ``prepare`` returns: the handle actors get, and every ObjectRef it made."""

    handle: Any
    refs: list[ray.ObjectRef] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _moved(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model.to(device)`` where it moves something: on the CPU that walk alone costs milliseconds,
    which the alternatives' users would not pay (they call it for a GPU only)."""
    return model if device == "cpu" else model.to(device)


OURS_OPTIONS: dict[str, Any] = {}  # keyword arguments of our prepare calls (bench --gpu-copiers)


def _prepare_ours(backend: str) -> Callable[[torch.nn.Module, str], Prepared]:
    def prepare(model: torch.nn.Module, workdir: str) -> Prepared:
        from ray_zerocopy.prepare import prepare_model_for_actors

        model_ref = prepare_model_for_actors(model, backend=backend, **OURS_OPTIONS)
        # actors get the small ModelRef itself, as Ray Data's fn_constructor_kwargs deliver it (and as
        # users hold it); the other approaches get what their users hold: an ObjectRef to the data
        return Prepared(model_ref, list(model_ref.object_refs))

    return prepare


CHECKPOINT: dict[str, str] = {}  # "path": the bench model saved with save_pretrained (bench --checkpoint)
CKPT_PREFIX = "rzc-ckpt:"


def _prepare_ours_checkpoint(backend: str) -> Callable[[torch.nn.Module, str], Prepared]:
    """Ours from the checkpoint folder: a meta skeleton built from its config (timed too), no model in the driver."""
    def prepare(model: torch.nn.Module, workdir: str) -> Prepared:
        from ray_zerocopy.hf import prepare_pretrained

        model_ref = prepare_pretrained(CHECKPOINT["path"], backend=backend, progress=False, **OURS_OPTIONS)
        return Prepared(model_ref, list(model_ref.object_refs))

    return prepare


def _prepare_from_pretrained_put(model: torch.nn.Module, workdir: str) -> Prepared:
    """What users do without us: from_pretrained in the driver, then ray.put of the model."""
    loaded = cast(Any, type(model)).from_pretrained(  # (a transformers model)
        CHECKPOINT["path"], dtype=next(model.parameters()).dtype).eval()
    ref = ray.put(loaded)
    return Prepared(ref, [ref])


def _load_ours(handle: Any, spec: ModelSpec, device: str, share_gpu: bool = False) -> torch.nn.Module:
    from ray_zerocopy.load import load_model_in_actor

    return load_model_in_actor(handle, device=None if device == "cpu" else device, share_gpu=share_gpu)


def _prepare_ray_put(model: torch.nn.Module, workdir: str) -> Prepared:
    ref = ray.put(model)
    return Prepared(ref, [ref])


def _load_ray_put(handle: ray.ObjectRef, spec: ModelSpec, device: str) -> torch.nn.Module:
    return _moved(ray.get(handle), device)


def _prepare_classic(model: torch.nn.Module, workdir: str) -> Prepared:
    """Per-module dicts of numpy arrays (each tensor cloned) + a deep copy with the tensors set to None."""
    tensors = []
    for _, module in model.named_modules():
        params = {n: p.detach().clone().numpy() for n, p in module.named_parameters(recurse=False)}
        buffers = {n: b.detach().clone().numpy() for n, b in module.named_buffers(recurse=False)}
        tensors.append({"params": params, "buffers": buffers})
    skeleton = copy.deepcopy(model)
    for _, module in skeleton.named_modules():
        for name in [*module._parameters, *module._buffers]:
            setattr(module, name, None)
    ref = ray.put((skeleton, tensors))
    return Prepared(ref, [ref])


def _load_classic(handle: ray.ObjectRef, spec: ModelSpec, device: str) -> torch.nn.Module:
    skeleton, tensors = ray.get(handle)
    for (_, module), entry in zip(skeleton.named_modules(), tensors):
        for name, array in entry["params"].items():
            module.register_parameter(name, torch.nn.Parameter(torch.as_tensor(array), requires_grad=False))
        for name, array in entry["buffers"].items():
            module.register_buffer(name, torch.as_tensor(array))
    return _moved(skeleton, device)


def _prepare_torch_file(model: torch.nn.Module, workdir: str) -> Prepared:
    path = os.path.join(workdir, "model.pt")
    torch.save(all_tensors(model), path)
    return Prepared(path, files=[path])


def _load_torch(handle: str, spec: ModelSpec, device: str) -> torch.nn.Module:
    return _moved(load_torch_file(spec, handle, mmap=False), device)


def _load_torch_mmap(handle: str, spec: ModelSpec, device: str) -> torch.nn.Module:
    return _moved(load_torch_file(spec, handle, mmap=True), device)


def _prepare_safetensors(model: torch.nn.Module, workdir: str) -> Prepared:
    from safetensors.torch import save_file

    path = os.path.join(workdir, "model.safetensors")
    unique, aliases = dedupe_tensors(model)  # save_file refuses shared tensors: store ties once
    save_file(unique, path)
    return Prepared((path, aliases), files=[path])


def _load_safetensors(handle: tuple[str, dict[str, str]], spec: ModelSpec, device: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    path, aliases = handle
    model = build_model(spec, meta=True)
    assign_tensors(model, load_file(path), aliases)
    return _moved(model, device)


@dataclass(frozen=True)
class Approach:
    """One way to get the model into N actors."""

    name: str
    kind: str  # "ours", "ray", "classic" or "disk"
    about: str
    prepare: Callable[[torch.nn.Module, str], Prepared]
    load: Callable[[Any, ModelSpec, str], torch.nn.Module]
    copies: bool  # each actor holds a private copy (sizes the memory check before running it)


NATIVE = "ray_native"  # run by a second driver with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1
OTHERS: dict[str, Approach] = {a.name: a for a in [
    Approach("classic", "classic", "numpy dicts per module + deep-copied skeleton, torch.as_tensor on load",
             _prepare_classic, _load_classic, False),
    Approach(NATIVE, "ray", "ray.put(model) with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (driver and workers)",
             _prepare_ray_put, _load_ray_put, False),
    Approach("ray_put", "ray", "plain ray.put(model), ray.get in each actor",
             _prepare_ray_put, _load_ray_put, True),
    Approach("from_pretrained_put", "ray", "from_pretrained(checkpoint folder) in the driver, then ray.put(model) "
             "(needs --checkpoint)", _prepare_from_pretrained_put, _load_ray_put, True),
    Approach("torch_load", "disk", "torch.load of a state-dict file into a meta skeleton",
             _prepare_torch_file, _load_torch, True),
    Approach("torch_load_mmap", "disk", "torch.load(mmap=True) of a state-dict file into a meta skeleton",
             _prepare_torch_file, _load_torch_mmap, False),
    Approach("safetensors_load_file", "disk", "safetensors.torch.load_file into a meta skeleton",
             _prepare_safetensors, _load_safetensors, True),
]}
OURS_PREFIX = "rzc:"


def get_approach(name: str) -> Approach:
    """The approach called ``name``: ``rzc:<backend>`` for each transport of ours, or one of ``OTHERS``."""
    if name.startswith(OURS_PREFIX):
        backend = name[len(OURS_PREFIX):]
        return Approach(name, "ours", f"ray_zerocopy, backend {backend!r}", _prepare_ours(backend), _load_ours, False)
    if name.startswith(CKPT_PREFIX):
        backend = name[len(CKPT_PREFIX):]
        return Approach(name, "ours", f"ray_zerocopy from the checkpoint folder, backend {backend!r}",
                        _prepare_ours_checkpoint(backend), _load_ours, False)
    return OTHERS[name]
