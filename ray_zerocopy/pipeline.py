"""Pipelines: objects that hold several models as attributes, prepared in the driver and loaded in an actor.

:func:`rewrite_pipeline_for_actors` prepares every model of a pipeline (models sharing a submodule are
prepared together, as one group) and returns a skeleton without them; :func:`load_pipeline_in_actor` puts
the loaded models back. The helpers that find and swap a pipeline's models serve ``invoke.py`` too.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import ray
import torch

from ray_zerocopy._tensors import flat_tensors
from ray_zerocopy.errors import (
    NoModelsError,
    NotAModuleError,
    PipelineRefsError,
    PipelineRefsTypeError,
    UnexpectedArgumentError,
)
from ray_zerocopy.load import LoadOptions, load_model, member_of
from ray_zerocopy.model_ref import ModelRef, as_model_ref
from ray_zerocopy.plugins import DEFAULT_BACKEND, check_backend_arg, tensor_adapters
from ray_zerocopy.prepare import prepare_model_for_actors


def _found_model_names(pipeline: object) -> list[str]:
    """The model attributes of a pipeline, found as the original ray_zerocopy finds them (``dir()``, so
    ``__slots__`` and class attributes count), and every one in its ``__dict__``, private ones too; properties are
    skipped (they compute or alias a value, and cannot be set to None in the skeleton)."""
    if isinstance(pipeline, torch.nn.Module):
        return [k for k, v in pipeline._modules.items() if isinstance(v, torch.nn.Module)]
    names = list(getattr(pipeline, "__dict__", {}))
    names += [k for k in dir(pipeline) if not k.startswith("_") and k not in names]
    found = []
    for name in names:
        if isinstance(getattr(type(pipeline), name, None), property):
            continue
        try:
            value = getattr(pipeline, name)
        except Exception:  # an attribute that raises (e.g. an empty slot) holds no model
            continue
        if isinstance(value, torch.nn.Module):
            found.append(name)
    return found


def model_attrs(pipeline: object, names: Sequence[str] | None) -> list[str]:
    """The model attributes of ``pipeline``: ``names`` checked, or every model found (:func:`_found_model_names`).

    Raises:
        NotAModuleError: a named attribute is not a model.
        NoModelsError: there is none.
    """
    if names is None:
        names = _found_model_names(pipeline)
    else:
        for name in names:
            value = getattr(pipeline, name, None)
            if not isinstance(value, torch.nn.Module):
                raise NotAModuleError(value, where=f"pipeline attribute {name!r}")
    if not names:
        raise NoModelsError(pipeline)
    return list(names)


def shallow_copy(obj: Any) -> Any:
    """``copy.copy(obj)``; for a module, with its own ``_modules`` (models are then swapped in the copy only)."""
    out = copy.copy(obj)
    if isinstance(out, torch.nn.Module):  # copy.copy shares _modules: never touch the caller's object
        out._modules = dict(out._modules)
    return out


def set_attr(obj: Any, name: str, value: Any) -> None:
    """setattr that also lets a Module-pipeline hold a non-Module (None, a shim) where a model was, and
    sets the field of a frozen dataclass (on our own shallow copy, as its ``__init__`` does)."""
    if isinstance(obj, torch.nn.Module) and name in obj._modules:
        del obj._modules[name]
        object.__setattr__(obj, name, value)
    elif getattr(getattr(type(obj), "__dataclass_params__", None), "frozen", False):
        object.__setattr__(obj, name, value)
    else:
        setattr(obj, name, value)


def rewrite_pipeline_for_actors(
    pipeline: Any, model_attr_names: Sequence[str] | None = None, backend: str = DEFAULT_BACKEND, *,
    gpu_copiers: bool = False, device: Any = None,
) -> tuple[Any, dict[str, ModelRef]]:
    """Prepare every model held as an attribute of ``pipeline`` (several models in one object).

    Args:
        pipeline: any object whose attributes include ``nn.Module`` instances.
        model_attr_names: which attributes are models; default: every ``nn.Module`` attribute.
        backend: weight transport for all the models.
        gpu_copiers: as for :func:`~ray_zerocopy.prepare.prepare_model_for_actors`, for every model.
        device: not taken (the original ray_zerocopy's keyword): a pipeline is prepared on no device.

    Returns:
        ``(skeleton, model_refs)``: a shallow copy of the pipeline with those attributes set to
        ``None``, and ``{attribute name: ModelRef}``. A model held under two names is stored once;
        models that share a submodule (or tensors) are prepared together, so the shared weights are
        stored once and stay shared after :func:`load_pipeline_in_actor`.

    Raises:
        NoModelsError: the pipeline holds no model.
        NotAModuleError: a named attribute is not a model.
        BackendArgumentError: ``backend`` is not a backend name (e.g. the original's positional ``device``).
        UnexpectedArgumentError: ``device=`` was given.

    Example:
        >>> skeleton, refs = rewrite_pipeline_for_actors(pipe)  # doctest: +SKIP
        >>> pipe = load_pipeline_in_actor(skeleton, refs, device="cuda")  # doctest: +SKIP
    """
    if device is not None:
        raise UnexpectedArgumentError(
            "rewrite_pipeline_for_actors", "device", device, "leave it out here (the weights go to Ray's object store, "
            f"on no device) and load with load_pipeline_in_actor(skeleton, refs, device={str(device)!r}) in the actor")
    check_backend_arg(backend, "rewrite_pipeline_for_actors", 3, "device")
    names = model_attrs(pipeline, model_attr_names)
    models = {id(m): m for m in (getattr(pipeline, name) for name in names)}  # a model held twice: once
    if share_parts(list(models.values())):
        by_id = dict(zip(models, prepare_together(list(models.values()), backend, gpu_copiers)))
    else:
        by_id = {key: prepare_model_for_actors(m, backend=backend, gpu_copiers=gpu_copiers) for key, m in models.items()}
    stamped = {key: dataclasses.replace(ref, pipeline_attrs=tuple(names)) for key, ref in by_id.items()}
    refs = {name: stamped[id(getattr(pipeline, name))] for name in names}  # (a model held twice: one ref)
    skeleton = shallow_copy(pipeline)
    for name in names:
        set_attr(skeleton, name, None)
    return skeleton, refs


def share_parts(models: list[torch.nn.Module]) -> bool:
    """True if two of the models hold the same submodule, or tensors over the same bytes."""
    owner: dict[tuple, int] = {}
    adapters = tensor_adapters()  # (a quantized tensor's bytes are those of its inner tensors)
    for i, model in enumerate(models):
        keys: set[tuple] = {("module", id(m)) for m in model.modules()}
        tensors = [inner for t in [*model.parameters(), *model.buffers()] for _, inner in flat_tensors("", t, adapters)]
        keys |= {("bytes", t.device, t.untyped_storage().data_ptr())
                 for t in tensors if t.device.type != "meta" and t.nbytes}
        for key in keys:
            if owner.setdefault(key, i) != i:
                return True
    return False


def prepare_together(models: list[torch.nn.Module], backend: str, gpu_copiers: bool = False) -> list[ModelRef]:
    """Prepare models that share parts as one ``ModuleList``: the shared weights are stored once, and
    an actor loads them as one object (the submodule every model holds is one module again). Each
    model gets a ModelRef of the whole group naming its index (loading one alone loads the group)."""
    group = prepare_model_for_actors(torch.nn.ModuleList(models), backend=backend, gpu_copiers=gpu_copiers)
    return [dataclasses.replace(group, member=i) for i in range(len(models))]


def load_pipeline_in_actor(
    skeleton: Any,
    model_refs: Mapping[str, ModelRef] | ray.ObjectRef,
    device: str | torch.device | None = None,
    backend: str | None = None,
    use_fast_load: bool = False,
    *,
    private_copy: bool = False,
    dtype: torch.dtype | None = None,
    share_gpu: bool = False,
) -> Any:
    """Rebuild a pipeline from :func:`rewrite_pipeline_for_actors` inside an actor.

    Args:
        skeleton: the pipeline skeleton (or an ObjectRef to it).
        model_refs: ``{attribute name: ModelRef}`` (or an ObjectRef to it).
        device, backend, use_fast_load, private_copy, dtype, share_gpu: as for :func:`load_model_in_actor`.

    Returns:
        A shallow copy of the skeleton with every model loaded (shared models loaded once).

    Raises:
        PipelineRefsError: the refs do not match the skeleton (names missing, unknown to it, or not ModelRefs).

    Example:
        >>> pipe = load_pipeline_in_actor(skeleton, refs)  # doctest: +SKIP
    """
    options = LoadOptions(device, backend, use_fast_load, private_copy, dtype, share_gpu)
    options.check("load_pipeline_in_actor", 4)
    if isinstance(skeleton, ray.ObjectRef):
        skeleton = ray.get(skeleton)
    refs: Mapping[str, ModelRef] = ray.get(model_refs) if isinstance(model_refs, ray.ObjectRef) else model_refs
    refs = _checked_refs(skeleton, refs)
    pipeline = shallow_copy(skeleton)
    loaded: dict[str, torch.nn.Module] = {}  # by ModelRef.uid: models prepared together load together
    for name, given in refs.items():
        ref = as_model_ref(given)
        if ref.uid not in loaded:
            loaded[ref.uid] = load_model(dataclasses.replace(ref, member=None), options)
        model = loaded[ref.uid]
        set_attr(pipeline, name, model if ref.member is None else member_of(model, ref.member))
    return pipeline


_ABSENT = object()


def _checked_refs(skeleton: Any, refs: Any) -> dict[str, ModelRef]:
    """``refs`` as ModelRefs by name, checked against the skeleton: each name a ``None`` attribute of it, and
    exactly the names prepared together (a model attribute left out would stay ``None`` without a word).

    Raises:
        PipelineRefsTypeError: ``refs`` is not a mapping of names to ModelRefs.
        PipelineRefsError: names are missing or unknown.
    """
    if not isinstance(refs, Mapping):
        raise PipelineRefsTypeError(["?"], refs, f"model_refs must be a dict {{attribute name: ModelRef}}, got a "
                                    f"{type(refs).__qualname__}")
    if not refs:
        raise PipelineRefsError([], refs, "no model refs given (rewrite_pipeline_for_actors prepares one at least)")
    wrong = {k: type(v).__qualname__ for k, v in refs.items()
             if not isinstance(k, str) or not isinstance(v, (ModelRef, ray.ObjectRef))}
    out = {name: as_model_ref(given) for name, given in refs.items() if name not in wrong}
    expected = sorted({n for ref in out.values() for n in ref.pipeline_attrs}
                      or {n for n in out if getattr(skeleton, n, _ABSENT) is None})
    missing = [n for n in expected if n not in refs]
    unknown = sorted(str(n) for n in refs if n not in expected or getattr(skeleton, n, _ABSENT) is not None)
    if wrong:
        raise PipelineRefsTypeError(expected, refs, f"values that are not ModelRefs: {wrong}")
    if missing or unknown:
        raise PipelineRefsError(expected, refs, f"missing {missing}, unknown to the skeleton {unknown}")
    return out
