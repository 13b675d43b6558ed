"""Prepare a model for sharing, in the driver: split it, store its weights once, return a ModelRef."""

from __future__ import annotations

import dataclasses
import os

import torch

from ray_zerocopy._store import store_weights
from ray_zerocopy._tensors import SplitModel, split_model, weight_kinds
from ray_zerocopy.errors import NotAModuleError, UpdateMismatchError
from ray_zerocopy.model_ref import ModelRef, object_refs
from ray_zerocopy.plugins import DEFAULT_BACKEND, backend_infos, check_backend_arg, get_backend, tensor_adapters


def prepare_model_for_actors(
    model: torch.nn.Module,
    backend: str = DEFAULT_BACKEND,
    *,
    checkpoint: str | os.PathLike | None = None,
    node: str | None = None,
    progress: bool | None = None,
    gpu_copiers: bool = False,
    like: ModelRef | None = None,
) -> ModelRef:
    """Put a model's weights into Ray's object store once; return a small ref to pass to actors.

    Call it in the driver (Ray must be initialized). The weights are written once into the
    object store, streamed from where they are (the model's tensors, or the checkpoint's file
    pages): the driver makes no copy of them. The model itself is not copied or changed.

    Args:
        model: the model to share (any ``torch.nn.Module``; CUDA weights are stored from the CPU).
            With ``checkpoint``, its parameters may be on the meta device (built under
            ``accelerate.init_empty_weights()``, buffers real).
        backend: name of the weight transport (``python -m ray_zerocopy backends`` lists them).
        checkpoint: take the weights from this ``.safetensors`` file, or folder in Hugging Face layout
            (``model.safetensors``, or ``model.safetensors.index.json`` and its shards). Names, shapes
            and dtypes are checked against ``model`` before anything is stored; tensors the checkpoint
            lacks (non-persistent buffers) come from the model, and must not be on the meta device.
        node: a node ID: prepare there instead of in this process. A small owner actor on that node
            reads ``checkpoint`` (a path readable there) and owns the weights in that node's object
            store; the ModelRef keeps it alive, and when the last copy of the ref goes, it goes with
            the weights. Needs ``checkpoint``.
        progress: show bytes and rate on stderr while preparing; ``None``: for models of 1 GiB or more,
            unless the environment sets ``RAY_ZEROCOPY_PROGRESS=0``.
        gpu_copiers: start, on every GPU of every node with GPUs, a copier process that keeps the
            weights pinned and fills each GPU load of this model (first loads included) with one DMA
            through CUDA IPC (``gpu_copier.py``); returns once they are up. Costs a CUDA context per GPU and keeps the weights
            pinned until ``$RAY_ZEROCOPY_COPIER_WAIT_S`` (300) pass with no load, or this process (the weights'
            owner) ends; ``gpu_copier.stop_copiers()`` ends them now.

    Returns:
        A :class:`ModelRef`; pass it to actors (e.g. in ``fn_constructor_kwargs``).

    Raises:
        NotAModuleError: ``model`` is not an ``nn.Module``.
        UnknownBackendError: no backend of that name is installed.
        BackendArgumentError: ``backend`` is not a backend name.
        UnsupportedModelError: a submodule cannot be split (meta/quantized tensors, unpicklable parts,
            a tensor outside parameters and buffers that cannot be shared).
        CheckpointError: ``checkpoint`` is not a safetensors file or Hugging Face folder.
        CheckpointMismatchError: the checkpoint's tensors do not match the model's (each one named).
        PrepareNodeError: ``node`` is not an alive node, or is given without ``checkpoint``.
        UpdateMismatchError: with ``like``, the weights' names differ from that version's (each one named).

    Example:
        >>> ref = prepare_model_for_actors(torch.nn.Linear(4, 2))  # doctest: +SKIP
        >>> with accelerate.init_empty_weights():  # doctest: +SKIP
        ...     skeleton = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        >>> ref = prepare_model_for_actors(skeleton, checkpoint="llama/")  # doctest: +SKIP
    """
    return prepare_split(model, backend, checkpoint, node, progress, gpu_copiers, like)[0]


def prepare_split(model: torch.nn.Module, backend: str, checkpoint: str | os.PathLike | None = None, node: str | None = None,
                  progress: bool | None = None, gpu_copiers: bool = False,
                  like: ModelRef | None = None) -> tuple[ModelRef, SplitModel]:
    """:func:`prepare_model_for_actors`, and the split it stored (the tensors' names and shapes, for task shims)."""
    if not isinstance(model, torch.nn.Module):
        raise NotAModuleError(model)
    check_backend_arg(backend, "prepare_model_for_actors", 2)
    backend_infos()  # discover every plugin here, in the driver: one that clashes with a built-in fails now
    chosen = get_backend(backend)
    split = split_model(model, allow_meta=checkpoint is not None, adapters=tensor_adapters()) if like is None else (
        _split_like(model, like, checkpoint is not None))
    stored = store_weights(chosen, split, checkpoint, node, progress)
    nbytes = sum(t.nbytes for t in split.weights.values())
    ref = ModelRef(split.skeleton, stored.payload, chosen.name, chosen.format_version, nbytes, stored.layouts,
                   owner=stored.owner, object_refs=object_refs(stored.payload), gpu_copiers=gpu_copiers)
    if gpu_copiers:
        from ray_zerocopy.gpu_copier import start_copiers

        start_copiers(ref)
    return ref, split


def _split_like(model: torch.nn.Module, base: ModelRef, allow_meta: bool) -> SplitModel:
    """The weights of ``model`` with the skeleton of ``base``, a previous version of it (names checked)."""
    names = {name for name, _ in weight_kinds(base.skeleton)}
    split = split_model(model, allow_meta, adapters=tensor_adapters(), with_skeleton=False)
    if set(split.weights) == names:
        return dataclasses.replace(split, skeleton=base.skeleton)
    split = split_model(model, allow_meta, adapters=tensor_adapters())  # (tensors that only pickling finds)
    if set(split.weights) == names:
        return dataclasses.replace(split, skeleton=base.skeleton)
    if split.adapted:  # (adapted tensors are stored under their inner names: the actor compares them)
        return split
    raise UpdateMismatchError(sorted(names - set(split.weights)), sorted(set(split.weights) - names), [], where="driver")
