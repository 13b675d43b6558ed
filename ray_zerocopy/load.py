"""Load a prepared model in an actor (or task): the load options, the device, and the one load path.

``load_model_in_actor`` and ``load_pipeline_in_actor`` take the same keyword arguments; they are
gathered once into :class:`LoadOptions`, checked once (:meth:`LoadOptions.check`), and every load goes
through :func:`load_model`: fetch the backend's tensors (CPU copy-on-write views of the object store, or a
copy on a GPU), then rebuild the model around them; with ``share_gpu`` on a GPU, ``gpu_share.load_shared``
builds it around the device copy that GPU shares instead.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, cast

import ray
import torch

from ray_zerocopy import _cuda
from ray_zerocopy._shm import private_views
from ray_zerocopy._tensors import adapted_tensors, cast_floating, rebuild_model
from ray_zerocopy.errors import (
    AdaptedDtypeError,
    BackendMismatchError,
    DeviceError,
    FormatVersionError,
    LoadDtypeError,
    SkeletonDamagedError,
    SkeletonImportError,
    WeightsLostError,
)
from ray_zerocopy.model_ref import ModelRef, as_model_ref
from ray_zerocopy.plugins import check_backend_arg, get_backend


@dataclass(frozen=True)
class LoadOptions:
    """The keyword arguments of the load functions (see :func:`load_model_in_actor` for each)."""

    device: str | torch.device | None = None
    backend: str | None = None
    use_fast_load: bool = False
    private_copy: bool = False
    dtype: torch.dtype | None = None
    share_gpu: bool = False

    def check(self, function: str, backend_position: int) -> None:
        """Refuse bad values before anything is fetched.

        Raises:
            LoadDtypeError: ``dtype`` is not a floating-point torch dtype.
            BackendArgumentError: ``backend`` is not a name (``backend_position``: its place in ``function``).
        """
        dtype = self.dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise LoadDtypeError(dtype)
        check_backend_arg(self.backend, function, backend_position, "use_fast_load", optional=True)


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
        LoadDtypeError: ``dtype`` is not a floating-point torch dtype (``AdaptedDtypeError``: the model has
            quantized tensors, which cannot be cast).
        WeightsLostError: the weights are gone (their owner died, or they were lost or evicted), or
            the ref was unpickled outside Ray (plain ``pickle``), so Ray cannot find them.
        SharedWeightWriteError: (later, from a call) with ``share_gpu=True``, the model wrote into the
            parameters it shares on the GPU (they are restored first).

    Example:
        >>> model = load_model_in_actor(ref, device="cuda")  # doctest: +SKIP
    """
    options = LoadOptions(device, backend, use_fast_load, private_copy, dtype, share_gpu)
    options.check("load_model_in_actor", 3)
    return load_model(model_ref, options)


def load_model(model_ref: Any, options: LoadOptions) -> torch.nn.Module:
    """:func:`load_model_in_actor` with checked options (model ``member`` of a group, if the ref names one)."""
    try:
        ref = as_model_ref(model_ref)
        model = _load(ref, options)
        model.__dict__["_rzc_options"] = options  # (what update_model_in_actor loads a new version with)
    except ray.exceptions.ObjectLostError as exc:  # OwnerDiedError, ReferenceCountingAssertionError, ...
        raise WeightsLostError(exc) from exc
    return model if ref.member is None else member_of(model, ref.member)


def _load(ref: ModelRef, options: LoadOptions) -> torch.nn.Module:
    if options.backend is not None and options.backend != ref.backend:
        raise BackendMismatchError(options.backend, ref.backend)
    dev = resolve_device(options.device)
    if options.dtype is not None and (adapted := adapted_tensors(ref.skeleton)):
        raise AdaptedDtypeError(options.dtype, *next(iter(adapted.items())))
    share_gpu = options.share_gpu and not options.private_copy
    source = None
    if dev.type == "cuda" and not share_gpu:
        from ray_zerocopy import gpu_copier

        source = gpu_copier.copier_source(ref, dev)  # the node's copier of this model (looked up meanwhile)
        if source is None:
            _cuda.warm_ring(dev)  # pins the staging ring while the payload is fetched and read
    chosen = get_backend(ref.backend)
    if chosen.format_version != ref.format_version:
        raise FormatVersionError(ref.backend, ref.format_version, chosen.format_version)
    if share_gpu:
        from ray_zerocopy import gpu_share

        shared = gpu_share.load_shared(ref, dev, lambda: _fetch(ref, chosen, dev, options.dtype),
                                       dtype=options.dtype, as_parameters=not options.use_fast_load)
        if shared is not None:
            return shared
    with _cuda.copy_source(source):  # (a copier's fill may run while the model is built: it ends with this block)
        tensors = _fetch(ref, chosen, dev, options.dtype)
        if options.private_copy:
            tensors = {k: t.clone() if t.is_cpu else t for k, t in tensors.items()}
        elif dev.type == "cpu":
            tensors = private_views(tensors, chosen.shared_memory_marker)  # (a write stays in this load)
        with _cuda.finished_before_torch_calls():
            return _rebuild(ref, tensors, options)


def _rebuild(ref: ModelRef, tensors: dict, options: LoadOptions) -> torch.nn.Module:
    """:func:`rebuild_model`, with the skeleton's unpickling errors typed (they are raw pickle errors there)."""
    try:
        return rebuild_model(ref.skeleton, tensors, ref.layouts, as_parameters=not options.use_fast_load)
    except ModuleNotFoundError as exc:
        raise SkeletonImportError(
            f"module {exc.name!r}, which defines a class the model uses, is not importable in this process "
            f"(it is in the driver: {exc})",
            f"make it importable where actors run: ray.init(runtime_env={{'py_modules': [<the module {exc.name!r} "
            "or its package folder>]}) or runtime_env={'working_dir': '.'} for a local file, or install its "
            "package on every node") from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise SkeletonDamagedError(
            f"{len(ref.skeleton)} bytes that are not a whole pickle ({type(exc).__name__}: {exc})",
            "pass the ModelRef that prepare_model_for_actors returned, unchanged; or prepare the model again") from exc


class _ViaRoot:
    """A hook that the loader put on a group of models (see ``pipeline.prepare_together``), run for one of
    them: the group itself is never called. A pickled or deep-copied model gets a no-op (its copy is
    private memory, like the write guard's own copies)."""

    def __init__(self, root: torch.nn.Module | None, hook: Any) -> None:
        self.root, self.hook = root, hook

    def __call__(self, module: torch.nn.Module, *rest: Any) -> Any:
        return None if self.hook is None else self.hook(self.root, *rest)

    def __reduce__(self) -> tuple:
        return _ViaRoot, (None, None)


def member_of(root: torch.nn.Module, index: int) -> torch.nn.Module:
    """Model ``index`` of a loaded group, with the hooks the loader put on the group (the write guard's)."""
    model = cast(torch.nn.ModuleList, root)[index]  # (see pipeline.prepare_together)
    if not getattr(model, "_rzc_via_root", False):  # (a pipeline takes each member once; a reload is a new root)
        for hook in root._forward_pre_hooks.values():
            model.register_forward_pre_hook(_ViaRoot(root, hook))
        for hook_id, hook in root._forward_hooks.items():
            model.register_forward_hook(_ViaRoot(root, hook), always_call=hook_id in root._forward_hooks_always_called)
        model.__dict__.update({k: v for k, v in vars(root).items() if k.startswith("_rzc")})
        model._rzc_via_root = True  # type: ignore[assignment]  # (torch types Module attributes as Tensor | Module)
    return model


def _fetch(ref: ModelRef, chosen: Any, dev: torch.device, dtype: torch.dtype | None) -> dict:
    """The backend's tensors of ``ref`` on ``dev``, cast to ``dtype``."""
    with torch.inference_mode(False):
        tensors = chosen.get(ref.payload, dev)
        with _cuda.finished_before_torch_calls():  # (the cast reads the bytes)
            return cast_floating(tensors, dtype) if dtype is not None else tensors


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
        raise DeviceError(device, f"not a device name ({exc})", "pass 'cpu', 'cuda' or 'cuda:N'") from None
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
