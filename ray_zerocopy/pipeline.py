"""Pipelines: objects that hold several models as attributes, prepared in the driver and loaded in an actor.

:func:`rewrite_pipeline_for_actors` prepares every model of a pipeline (models sharing a submodule are
prepared together, as one group) and returns a skeleton without them; :func:`load_pipeline_in_actor` puts
the loaded models back. The helpers that find and swap a pipeline's models serve ``invoke.py`` too.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import io
import re
from typing import Any, Mapping, Sequence

import ray
import torch

from ray_zerocopy._tensors import flat_tensors
from ray_zerocopy.errors import (
    HiddenModelError,
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
    return found + _contained_model_names(pipeline)


_MODULE_ATTRS = frozenset(torch.nn.Module().__dict__)  # a Module's own dicts (_modules, _parameters, hooks, ...)


def _contained_model_names(pipeline: object) -> list[str]:
    """Models one level inside dict, list and tuple attributes (in ``__dict__``): ``"attr['key']"``, ``"attr[0]"``
    (dict keys that are strings or integers, so the name reads back; other keys are refused with the rest)."""
    found = []
    for name, value in getattr(pipeline, "__dict__", {}).items():
        if isinstance(pipeline, torch.nn.Module) and name in _MODULE_ATTRS:
            continue
        if isinstance(value, dict):
            items = [(k, v) for k, v in value.items() if type(k) in (str, int)]
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        else:
            continue
        found += [f"{name}[{k!r}]" for k, v in items if isinstance(v, torch.nn.Module)]
    return found


_ITEM = re.compile(r"(\w+)\[(.+)\]")  # "attr['key']", "attr[0]": a model in a dict, list or tuple attribute


def get_attr(obj: Any, name: str, default: Any = None) -> Any:
    """``getattr(obj, name, default)``, where ``name`` may also be ``"attr[key]"`` (an item of a container attribute)."""
    item = _ITEM.fullmatch(name)
    if item is None or name in getattr(obj, "__dict__", {}):
        return getattr(obj, name, default)
    try:
        return getattr(obj, item[1])[ast.literal_eval(item[2])]
    except (AttributeError, LookupError, TypeError, ValueError, SyntaxError):
        return default


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
            value = get_attr(pipeline, name)
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
    sets the field of a frozen dataclass (on our own shallow copy, as its ``__init__`` does). For ``"attr[key]"``
    the container attribute is replaced by a copy holding ``value`` (the caller's container is never changed)."""
    item = _ITEM.fullmatch(name)
    if item is not None and name not in getattr(obj, "__dict__", {}):
        container, key = getattr(obj, item[1]), ast.literal_eval(item[2])
        if isinstance(container, tuple):
            items = [value if i == key else v for i, v in enumerate(container)]
            new = type(container)(*items) if hasattr(container, "_fields") else type(container)(items)
        else:
            new = copy.copy(container)
            new[key] = value  # type: ignore[index]  # (a dict or a list here)
        set_attr(obj, item[1], new)
    elif isinstance(obj, torch.nn.Module) and name in obj._modules:
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
        model_attr_names: which attributes are models; default: every ``nn.Module`` attribute, and every model
            one level inside a dict, list or tuple attribute (named ``"attr['key']"``, ``"attr[0]"``).
        backend: weight transport for all the models.
        gpu_copiers: as for :func:`~ray_zerocopy.prepare.prepare_model_for_actors`, for every model.
        device: not taken (the original ray_zerocopy's keyword): a pipeline is prepared on no device.

    Returns:
        ``(skeleton, model_refs)``: a shallow copy of the pipeline with those attributes set to
        ``None`` (models in a container: a copy of it holding ``None`` there), and ``{attribute name: ModelRef}``.
        A model held under two names is stored once;
        models that share a submodule (or tensors) are prepared together, so the shared weights are
        stored once and stay shared after :func:`load_pipeline_in_actor`.

    Raises:
        NoModelsError: the pipeline holds no model.
        NotAModuleError: a named attribute is not a model.
        BackendArgumentError: ``backend`` is not a backend name (e.g. the original's positional ``device``).
        UnexpectedArgumentError: ``device=`` was given.
        HiddenModelError: the skeleton would still hold a model with weights (inside another object), which every
            actor would unpickle as its own copy.

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
    models = {id(m): m for m in (get_attr(pipeline, name) for name in names)}  # a model held twice: once
    skeleton = shallow_copy(pipeline)
    for name in names:
        set_attr(skeleton, name, None)
    left_out = {id(get_attr(pipeline, n)) for n in _found_model_names(pipeline)} - set(models)  # (model_attr_names)
    _refuse_hidden_models(skeleton, left_out)  # (before any weight is put)
    if share_parts(list(models.values())):
        by_id = dict(zip(models, prepare_together(list(models.values()), backend, gpu_copiers)))
    else:
        by_id = {key: prepare_model_for_actors(m, backend=backend, gpu_copiers=gpu_copiers) for key, m in models.items()}
    by_id = {key: dataclasses.replace(ref, pipeline_attrs=tuple(names)) for key, ref in by_id.items()}
    refs = {name: by_id[id(get_attr(pipeline, name))] for name in names}  # (a model held twice: one ModelRef)
    return skeleton, refs


class _ModelFinder(ray.cloudpickle.Pickler):
    """Pickles a skeleton to nowhere, noting each model with weights it reaches (and pickling none of them)."""

    def __init__(self, root: object, exempt: set[int]) -> None:
        super().__init__(io.BytesIO())
        self.root, self.exempt = root, exempt
        self.found: list[torch.nn.Module] = []

    def persistent_id(self, obj: object) -> Any:
        if isinstance(obj, torch.Tensor):
            return 0  # (its bytes are not needed here)
        if not isinstance(obj, torch.nn.Module) or obj is self.root:
            return None
        if id(obj) in self.exempt:
            return 0  # (a model attribute that model_attr_names left out: the caller's choice, its parts too)
        if any(t.device.type != "meta" and t.numel() for t in [*obj.parameters(), *obj.buffers()]):
            self.found.append(obj)
            return 0
        return None


def _refuse_hidden_models(skeleton: object, exempt: set[int]) -> None:
    """Raise :class:`HiddenModelError` if pickling the skeleton would pickle a model with weights."""
    finder = _ModelFinder(skeleton, exempt)
    try:
        finder.dump(skeleton)
    except Exception:  # an unpicklable skeleton fails where Ray pickles it; models found so far still count
        pass
    if finder.found:
        model = finder.found[0]
        nbytes = sum(t.nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
        raise HiddenModelError(_path_to(skeleton, model), type(model).__qualname__, nbytes)


def _path_to(root: object, target: object, depth: int = 5) -> str | None:
    """Where ``target`` is inside ``root`` (``"holder.model"``, ``"parts['a'][0]"``), through attributes and
    container items, breadth first; None if not found within ``depth`` steps (e.g. behind a closure)."""
    level, seen = [("", root)], {id(root)}
    for _ in range(depth):
        nxt = []
        for path, obj in level:
            if isinstance(obj, dict):
                children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple)):
                children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
            else:
                fields = dict(getattr(obj, "__dict__", {}))
                if isinstance(obj, torch.nn.Module):  # submodules by their attribute names, not through _modules
                    fields = {k: v for k, v in fields.items() if k not in _MODULE_ATTRS} | dict(obj._modules)
                children = [(f"{path}.{k}" if path else k, v) for k, v in fields.items()]
            for child_path, child in children:
                if child is target:
                    return child_path
                if id(child) not in seen and not isinstance(child, (str, bytes, int, float, torch.Tensor)):
                    seen.add(id(child))
                    nxt.append((child_path, child))
        level = nxt
    return None


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
                      or {n for n in out if get_attr(skeleton, n, _ABSENT) is None})
    missing = [n for n in expected if n not in refs]
    unknown = sorted(str(n) for n in refs if n not in expected or get_attr(skeleton, n, _ABSENT) is not None)
    if wrong:
        raise PipelineRefsTypeError(expected, refs, f"values that are not ModelRefs: {wrong}")
    if missing or unknown:
        raise PipelineRefsError(expected, refs, f"missing {missing}, unknown to the skeleton {unknown}")
    return out
