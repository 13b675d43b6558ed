"""Share one copy of a model's weights between many Ray actors (and Ray Data actor pools).

The driver calls :func:`prepare_model_for_actors` once; every actor calls
:func:`load_model_in_actor` with the result and gets the model back in milliseconds,
its CPU weights being views into the node's shared object store.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import ray
import torch

from ray_zerocopy import keeper
from ray_zerocopy._log import warn_once
from ray_zerocopy._shm import private_views
from ray_zerocopy._store import store_weights
from ray_zerocopy._tensors import rebuild_model, split_model, weight_kinds
from ray_zerocopy.backend import Payload
from ray_zerocopy.errors import (
    BackendArgumentError,
    BackendMismatchError,
    DeviceError,
    FormatVersionError,
    InvalidModelRefError,
    LoadDtypeError,
    NoModelsError,
    NotAModuleError,
    WeightsLostError,
)
from ray_zerocopy.guard import guard_model
from ray_zerocopy.plugins import BUILTINS, backend_infos, get_backend

DEFAULT_BACKEND = "object_store"


@dataclass(frozen=True)
class ModelRef:
    """A model prepared for sharing: small and picklable; holding it keeps the weights alive.

    Attributes:
        skeleton: the pickled model without tensor data.
        payload: what the backend's ``put`` returned (it holds the ObjectRefs).
        backend: name of the backend that wrote ``payload``.
        format_version: that backend's payload format version.
        nbytes: bytes of unique weight data (tied tensors counted once).
        aliases: other names of tied tensors -> the name they are stored under.
        layouts: (shape, stride) of permuted tensors, stored flat in memory order.
        uid: unique per prepared model (names its GPU holders when actors share a device copy).
        owner: the actor that owns the weights when they were prepared on another node (``node=``);
            holding the ref keeps it alive. ``None`` where the preparing process owns them.
        object_refs: every ObjectRef in ``payload`` (a load checks that Ray tracks them: see
            :func:`_check_tracked`).
        member: for models of one pipeline that share submodules, prepared together as one
            ``ModuleList``: the index of this model in it (``None`` for a model prepared alone).
    """

    skeleton: bytes = field(repr=False)
    payload: Payload = field(repr=False)
    backend: str
    format_version: int
    nbytes: int
    aliases: Mapping[str, str] = field(default_factory=dict, repr=False)
    layouts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict, repr=False)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: Any = field(default=None, repr=False, compare=False)
    object_refs: tuple[ray.ObjectRef, ...] = field(default=(), repr=False)
    member: int | None = None

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickled outside Ray (Serve's .bind arguments), its ObjectRefs would be pinned for the rest of the
        # pickling process's life: travel by name instead, the keeper holds the refs (see keeper.py).
        if keeper.pickled_out_of_band():
            return keeper.restore, (keeper.keep(self),)
        return super().__reduce_ex__(protocol)

    def __copy__(self) -> ModelRef:
        return self  # immutable (and copying must not start a keeper)

    def __deepcopy__(self, memo: dict) -> ModelRef:
        return self


def prepare_model_for_actors(
    model: torch.nn.Module,
    backend: str = DEFAULT_BACKEND,
    *,
    checkpoint: str | os.PathLike | None = None,
    node: str | None = None,
    progress: bool | None = None,
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

    Example:
        >>> ref = prepare_model_for_actors(torch.nn.Linear(4, 2))  # doctest: +SKIP
        >>> with accelerate.init_empty_weights():  # doctest: +SKIP
        ...     skeleton = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        >>> ref = prepare_model_for_actors(skeleton, checkpoint="llama/")  # doctest: +SKIP
    """
    if not isinstance(model, torch.nn.Module):
        raise NotAModuleError(model)
    _check_backend_arg(backend, "prepare_model_for_actors", 2)
    backend_infos()  # discover every plugin here, in the driver: one that clashes with a built-in fails now
    chosen = get_backend(backend)
    split = split_model(model, allow_meta=checkpoint is not None)
    stored = store_weights(chosen, split, checkpoint, node, progress)
    nbytes = sum(t.nbytes for t in split.weights.values())
    return ModelRef(split.skeleton, stored.payload, chosen.name, chosen.format_version, nbytes, split.aliases,
                    stored.layouts, owner=stored.owner, object_refs=_object_refs(stored.payload))


def _object_refs(payload: Payload) -> tuple[ray.ObjectRef, ...]:
    """Every ObjectRef a backend's payload holds, in its attributes, dicts, lists and tuples (found once,
    in the driver). Never by pickling it: Ray pins for good every ObjectRef pickled outside its own
    serialization, so the weights would never be freed."""
    found: list[ray.ObjectRef] = []
    todo, seen = [payload], set()
    while todo:
        obj = todo.pop()
        if isinstance(obj, ray.ObjectRef):
            found.append(obj)
        elif id(obj) not in seen and not isinstance(obj, (str, bytes, int, float, torch.Tensor)):
            seen.add(id(obj))
            if isinstance(obj, dict):
                todo += obj.values()
            elif isinstance(obj, (list, tuple, set, frozenset)):
                todo += obj
            elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
                todo += [getattr(obj, k) for k in _attr_names(obj)]
    return tuple(found)


def _attr_names(obj: object) -> list[str]:
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if hasattr(obj, n)]
    return [n for n in names if not n.startswith("__")]


def _check_tracked(refs: Sequence[ray.ObjectRef]) -> None:
    """Raise WeightsLostError for an ObjectRef whose owner this process does not know: it was unpickled
    outside Ray (plain pickle), so Ray does not track it and ``ray.get`` would wait forever, freed or not.
    A local lookup (well under a microsecond per ref), no round trip."""
    try:
        core_worker = ray._private.worker.global_worker.core_worker
    except AttributeError:  # Ray not initialized here (ray.get raises its own error), or a Ray without it
        return
    for ref in refs:
        try:
            core_worker.get_owner_address(ref)
        except ValueError as exc:  # "... a Ray object whose owner is unknown ..."
            raise WeightsLostError(exc, object_ref=ref) from None


def _check_backend_arg(backend: object, function: str, position: int, original: str | None = None,
                       optional: bool = False) -> None:
    """Refuse a ``backend=`` that is not a backend name: a bool, a non-string, or a device name (the
    original ray_zerocopy took ``use_fast_load`` / ``device`` where ours takes ``backend``)."""
    if backend is None and optional:  # the load functions: None means the ref's backend
        return
    if isinstance(backend, str):
        if backend in BUILTINS:
            return
        try:
            torch.device(backend)
        except (RuntimeError, ValueError):
            return  # a name, maybe of a third-party backend (checked where it is looked up)
    raise BackendArgumentError(backend, function, position, original, optional)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The ``torch.device`` to load onto in this process; ``"cuda"`` means the actor's own GPU.

    Raises:
        DeviceError: the device string is malformed, or the device is not visible here.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(device, f"not a device name ({exc})") from None
    if dev.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        if not torch.cuda.is_available():
            raise DeviceError(device, f"no CUDA device is visible in this process (CUDA_VISIBLE_DEVICES={visible})")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(device, f"only {count} CUDA device(s) visible (CUDA_VISIBLE_DEVICES={visible})")
        return torch.device("cuda", index)
    if dev.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=dev)
        except Exception as exc:
            raise DeviceError(device, f"{type(exc).__name__}: {exc}") from None
    return dev


def _as_model_ref(model_ref: Any) -> ModelRef:
    if isinstance(model_ref, ray.ObjectRef):  # Ray Data passes constructor kwargs unresolved
        _check_tracked((model_ref,))
        model_ref = ray.get(model_ref)
    if not isinstance(model_ref, ModelRef):
        raise InvalidModelRefError(model_ref)
    _check_tracked(model_ref.object_refs)
    return model_ref


def load_model_in_actor(
    model_ref: ModelRef | ray.ObjectRef,
    device: str | torch.device | None = None,
    backend: str | None = None,
    use_fast_load: bool = False,
    *,
    private_copy: bool = False,
    dtype: torch.dtype | None = None,
    share_gpu: bool = False,
) -> torch.nn.Module:
    """Rebuild a prepared model inside an actor (or task): zero-copy on CPU, one copy to a GPU.

    Args:
        model_ref: what :func:`prepare_model_for_actors` returned, or an ObjectRef to it (also after
            Ray Serve's ``.bind(...)``, which pickles it outside Ray: see ``keeper.py``).
        device: ``None``/``"cpu"`` for shared-memory views, ``"cuda"`` / ``"cuda:N"`` for a GPU of this actor.
        backend: must be ``None`` or the backend the ref was prepared with.
        use_fast_load: keep parameters as plain tensors instead of ``nn.Parameter`` (slightly faster).
        private_copy: give this actor its own copy of the CPU weights, made now. Without it the weights
            are shared copy-on-write (see ``_shm.py``): a model may still write them, and a write copies
            only the pages it touches into this actor's memory; no other actor sees it.
        dtype: convert floating-point weights and buffers to this dtype on load (e.g. store float32,
            load ``torch.float16`` on a GPU). On a GPU the stored bytes are copied first and converted
            on the device, so the host holds no extra copy; on the CPU the converted tensors are
            private to this actor (not shared). Integer and bool tensors are never converted.
        share_gpu: on a CUDA device, map one device copy per physical GPU that every actor loading
            this ref with ``share_gpu=True`` shares (CUDA IPC, see ``gpu_share.py``), instead of
            copying the weights into this actor's own device memory. Where that cannot be done it
            logs one line and loads a private device copy.

    Returns:
        The model in eval mode, with ``requires_grad=False`` weights and ties restored.

    Raises:
        InvalidModelRefError: ``model_ref`` is not a model ref.
        BackendMismatchError: ``backend`` disagrees with the ref's backend.
        BackendArgumentError: ``backend`` is not a name (e.g. the original's positional ``use_fast_load=True``).
        UnknownBackendError: the ref's backend is not installed in this process.
        FormatVersionError: the payload was written by an incompatible backend version.
        DeviceError: ``device`` is not visible here.
        LoadDtypeError: ``dtype`` is not a floating-point torch dtype.
        WeightsLostError: the weights are gone (their owner died, or they were lost or evicted), or
            the ref was unpickled outside Ray (plain ``pickle``), so Ray cannot find them.
        SharedWeightWriteError: (later, from a call) with ``share_gpu=True``, the model wrote into the
            parameters it shares on the GPU (they are restored first).

    Example:
        >>> model = load_model_in_actor(ref, device="cuda")  # doctest: +SKIP
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LoadDtypeError(dtype)
    if backend is not None:
        _check_backend_arg(backend, "load_model_in_actor", 3, "use_fast_load", optional=True)
    try:
        ref = _as_model_ref(model_ref)
        model = _load(ref, device, backend, use_fast_load, private_copy, dtype, share_gpu)
    except ray.exceptions.ObjectLostError as exc:  # OwnerDiedError, ReferenceCountingAssertionError, ...
        raise WeightsLostError(exc) from exc
    return model if ref.member is None else _member(model, ref.member)


class _ViaRoot:
    """A hook that the loader put on a group of models (see :func:`_prepare_together`), run for one of
    them: the group itself is never called. A pickled or deep-copied model gets a no-op (its copy is
    private memory, like the write guard's own copies)."""

    def __init__(self, root: torch.nn.Module | None, hook: Any) -> None:
        self.root, self.hook = root, hook

    def __call__(self, module: torch.nn.Module, *rest: Any) -> Any:
        return None if self.hook is None else self.hook(self.root, *rest)

    def __reduce__(self) -> tuple:
        return _ViaRoot, (None, None)


def _member(root: torch.nn.Module, index: int) -> torch.nn.Module:
    """Model ``index`` of a loaded group, with the hooks the loader put on the group (the write guard's)."""
    model = root[index]
    if not getattr(model, "_rzc_via_root", False):  # (a pipeline takes each member once; a reload is a new root)
        for hook in root._forward_pre_hooks.values():
            model.register_forward_pre_hook(_ViaRoot(root, hook))
        for hook_id, hook in root._forward_hooks.items():
            model.register_forward_hook(_ViaRoot(root, hook), always_call=hook_id in root._forward_hooks_always_called)
        model.__dict__.update({k: v for k, v in vars(root).items() if k.startswith("_rzc")})
        model._rzc_via_root = True
    return model


def _load(
    model_ref: Any, device: Any, backend: str | None, use_fast_load: bool, private_copy: bool,
    dtype: torch.dtype | None = None, share_gpu: bool = False,
) -> torch.nn.Module:
    ref = _as_model_ref(model_ref)
    if backend is not None and backend != ref.backend:
        raise BackendMismatchError(backend, ref.backend)
    dev = resolve_device(device)
    if dev.type == "cuda" and not (share_gpu and not private_copy):
        from ray_zerocopy._cuda import warm_ring

        warm_ring(dev)  # pins the staging ring while the payload is fetched and read
    chosen = get_backend(ref.backend)
    if chosen.format_version != ref.format_version:
        raise FormatVersionError(ref.backend, ref.format_version, chosen.format_version)
    if share_gpu and not private_copy:
        shared = _shared_on_gpu(ref, dev, dtype, use_fast_load)
        if shared is not None:
            return shared
    with torch.inference_mode(False):
        tensors = chosen.get(ref.payload, dev)
        if dtype is not None:
            tensors = _cast_floating(tensors, dtype)
    if private_copy:
        tensors = {k: t.clone() if t.is_cpu else t for k, t in tensors.items()}
    elif dev.type == "cpu":
        tensors = private_views(tensors, chosen.shared_memory_marker)  # (a write stays in this load)
    return rebuild_model(ref.skeleton, tensors, ref.layouts, as_parameters=not use_fast_load)


def _shared_on_gpu(ref: ModelRef, dev: torch.device, dtype: torch.dtype | None, use_fast_load: bool) -> Any:
    """The model around the device copy shared by every actor on ``dev``'s GPU; None (and one log
    line) where it cannot be shared, so the caller loads a private copy."""
    if dev.type != "cuda":
        warn_once(f"share_gpu=True has no effect on {dev} (CPU weights are shared host memory anyway)")
        return None
    from ray_zerocopy import gpu_share

    try:
        with torch.inference_mode(False):
            tensors, holder = gpu_share.attach(ref, dev, dtype)
    except Exception as exc:  # no CUDA IPC, holder failed to start, ...
        warn_once(f"share_gpu: cannot share the device copy ({type(exc).__name__}: {exc}); loading a private copy")
        return None
    # buffers are private to each actor (models update them: LongRoPE's inv_freq, running statistics);
    # the shared parameters are watched
    params = {name for name, is_param in weight_kinds(ref.skeleton) if is_param}
    tensors = {k: t if k in params else t.clone() for k, t in tensors.items()}
    placed: list = []
    model = rebuild_model(ref.skeleton, tensors, ref.layouts, as_parameters=not use_fast_load, placed=placed)
    weakref.finalize(model, gpu_share.release, holder, os.getpid())
    shared = [(name, t) for name, t in placed if name in params]
    return guard_model(model, shared, restore=lambda: ray.get(holder.restore.remote()))


def _cast_floating(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``dtype=`` on load: convert floating-point tensors where they now are (on the GPU after the raw copy)."""
    out = {}
    for name, t in tensors.items():
        new = t.to(dtype) if t.is_floating_point() else t
        if new.device.type != "cpu" and new.untyped_storage().nbytes() > new.nbytes:
            new = new.clone()  # a view of a transport's raw device buffer would keep all of it alive
        out[name] = new
    return out


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


def _model_attr_names(pipeline: object, names: Sequence[str] | None) -> list[str]:
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


def _shallow_copy(obj: Any) -> Any:
    out = copy.copy(obj)
    if isinstance(out, torch.nn.Module):  # copy.copy shares _modules: never touch the caller's object
        out._modules = dict(out._modules)
    return out


def _set_attr(obj: Any, name: str, value: Any) -> None:
    """setattr that also lets a Module-pipeline hold a non-Module (None, a shim) where a model was."""
    if isinstance(obj, torch.nn.Module) and name in obj._modules:
        del obj._modules[name]
        object.__setattr__(obj, name, value)
    else:
        setattr(obj, name, value)


def rewrite_pipeline_for_actors(
    pipeline: Any, model_attr_names: Sequence[str] | None = None, backend: str = DEFAULT_BACKEND
) -> tuple[Any, dict[str, ModelRef]]:
    """Prepare every model held as an attribute of ``pipeline`` (several models in one object).

    Args:
        pipeline: any object whose attributes include ``nn.Module`` instances.
        model_attr_names: which attributes are models; default: every ``nn.Module`` attribute.
        backend: weight transport for all the models.

    Returns:
        ``(skeleton, model_refs)``: a shallow copy of the pipeline with those attributes set to
        ``None``, and ``{attribute name: ModelRef}``. A model held under two names is stored once;
        models that share a submodule (or tensors) are prepared together, so the shared weights are
        stored once and stay shared after :func:`load_pipeline_in_actor`.

    Raises:
        NoModelsError: the pipeline holds no model.
        NotAModuleError: a named attribute is not a model.
        BackendArgumentError: ``backend`` is not a backend name (e.g. the original's positional ``device``).

    Example:
        >>> skeleton, refs = rewrite_pipeline_for_actors(pipe)  # doctest: +SKIP
        >>> pipe = load_pipeline_in_actor(skeleton, refs, device="cuda")  # doctest: +SKIP
    """
    _check_backend_arg(backend, "rewrite_pipeline_for_actors", 3, "device")
    names = _model_attr_names(pipeline, model_attr_names)
    models = {id(m): m for m in (getattr(pipeline, name) for name in names)}  # a model held twice: once
    if _share_parts(list(models.values())):
        by_id = dict(zip(models, _prepare_together(list(models.values()), backend)))
    else:
        by_id = {key: prepare_model_for_actors(m, backend=backend) for key, m in models.items()}
    refs = {name: by_id[id(getattr(pipeline, name))] for name in names}
    skeleton = _shallow_copy(pipeline)
    for name in names:
        _set_attr(skeleton, name, None)
    return skeleton, refs


def _share_parts(models: list[torch.nn.Module]) -> bool:
    """True if two of the models hold the same submodule, or tensors over the same bytes."""
    owner: dict[tuple, int] = {}
    for i, model in enumerate(models):
        keys = {("module", id(m)) for m in model.modules()}
        keys |= {("bytes", t.device, t.untyped_storage().data_ptr())
                 for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta" and t.nbytes}
        for key in keys:
            if owner.setdefault(key, i) != i:
                return True
    return False


def _prepare_together(models: list[torch.nn.Module], backend: str) -> list[ModelRef]:
    """Prepare models that share parts as one ``ModuleList``: the shared weights are stored once, and
    an actor loads them as one object (the submodule every model holds is one module again). Each
    model gets a ModelRef of the whole group naming its index (loading one alone loads the group)."""
    group = prepare_model_for_actors(torch.nn.ModuleList(models), backend=backend)
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

    Example:
        >>> pipe = load_pipeline_in_actor(skeleton, refs)  # doctest: +SKIP
    """
    if backend is not None:
        _check_backend_arg(backend, "load_pipeline_in_actor", 4, "use_fast_load", optional=True)
    if isinstance(skeleton, ray.ObjectRef):
        skeleton = ray.get(skeleton)
    if isinstance(model_refs, ray.ObjectRef):
        model_refs = ray.get(model_refs)
    pipeline = _shallow_copy(skeleton)
    loaded: dict[str, torch.nn.Module] = {}  # by ModelRef.uid: models prepared together load together
    for name, ref in model_refs.items():
        ref = _as_model_ref(ref)
        if ref.uid not in loaded:
            loaded[ref.uid] = load_model_in_actor(
                dataclasses.replace(ref, member=None), device=device, backend=backend, use_fast_load=use_fast_load,
                private_copy=private_copy, dtype=dtype, share_gpu=share_gpu,
            )
        model = loaded[ref.uid]
        _set_attr(pipeline, name, model if ref.member is None else _member(model, ref.member))
    return pipeline
