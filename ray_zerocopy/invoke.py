"""Task-based sharing: each model call runs in a Ray task that loads the model zero-copy.

This is the ad-hoc mode (no long-lived actors): :func:`rewrite_pipeline` returns a
copy of a pipeline whose models are :class:`RemoteModel` shims. Loading costs
milliseconds, so every call loads afresh and no worker keeps weights pinned.

Library pipelines (``transformers.pipeline(...)``, diffusers' ``DiffusionPipeline``) also read
plain attributes of their models between calls (``model.config``, ``unet.dtype``, the signature
of ``model.forward``). The shim answers those in the driver from the model's skeleton, rebuilt
once on the meta device (no weight is read or moved); ``device`` is where the tasks load the
model (the CPU). An attribute that needs the weights, or a method that is not exposed, raises
:class:`~ray_zerocopy.errors.ShimAttributeError` naming it and the fix.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import ray
import torch

from ray_zerocopy._tensors import rebuild_model
from ray_zerocopy.errors import MethodNotFoundError, ShimAttributeError
from ray_zerocopy.load import load_model_in_actor
from ray_zerocopy.model_ref import ModelRef
from ray_zerocopy.pipeline import get_attr, model_attrs, set_attr, shallow_copy
from ray_zerocopy.plugins import DEFAULT_BACKEND
from ray_zerocopy.prepare import prepare_split

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
_NEEDS_WEIGHTS = (
    "read it from the model before rewrite_pipeline, expose a method that uses it with "
    "method_names=(..., 'method'), or load the model where it is used with load_model_in_actor"
)


@ray.remote
def _call_model(model_ref: ModelRef, method: str, args: tuple, kwargs: dict) -> Any:
    model = load_model_in_actor(model_ref)
    with torch.no_grad():
        return getattr(model, method)(*args, **kwargs)


class _RemoteMethod:
    """``shim.<method>``: runs the method in a task; carries the model method's signature (libraries inspect it)."""

    def __init__(self, shim: RemoteModel, name: str, signature: inspect.Signature | None) -> None:
        self._shim, self.__name__ = shim, name
        if signature is not None:
            self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self._shim.call_async(self.__name__, *args, **kwargs))


class RemoteModel:
    """Stands in for a model: calling one of ``method_names`` runs it in a Ray task.

    Other attributes (``config``, ``dtype``, ...) are read from the model's skeleton on the meta
    device, in the driver; ``device`` is the CPU, where the tasks load the model.

    Args:
        model_ref: the prepared model.
        method_names: the model methods that may be called through the shim (``"__call__"`` also
            exposes ``"forward"``).
        remote_options: options for the task (e.g. ``{"num_cpus": 1}``), see ``ray.remote``.
        specs: ``{tensor name: (shape, dtype)}`` of the model's tensors (what the meta skeleton is
            built from); :func:`rewrite_pipeline` fills it in.
        model_type: the model's class name, for error messages.
    """

    def __init__(
        self, model_ref: ModelRef, method_names: Sequence[str], remote_options: dict | None = None,
        specs: Specs | None = None, model_type: str = "model",
    ) -> None:
        self.model_ref = model_ref
        self.method_names = tuple(method_names)
        self.remote_options = dict(remote_options or {})
        self.specs = dict(specs) if specs is not None else None
        self.model_type = model_type
        self._skeleton: torch.nn.Module | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_skeleton": None}  # rebuilt on demand wherever the shim lands

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Start ``model.<method>(*args, **kwargs)`` in a task; returns the result's ObjectRef."""
        if method not in self.method_names:
            raise ShimAttributeError(
                method, self.model_type, f"method {method!r} is not exposed by this shim (exposed: {self.method_names})",
                f"pass method_names=(..., {method!r}) to rewrite_pipeline",
            )
        task = _call_model.options(**self.remote_options) if self.remote_options else _call_model
        return task.remote(self.model_ref, method, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.call_async("__call__", *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        exposed = self.__dict__.get("method_names")
        if name.startswith("__") or exposed is None:  # copy/pickle probes, or a half-built shim
            raise AttributeError(name)
        if name in exposed:
            return _RemoteMethod(self, name, _signature(self._meta_model(), name))
        if name == "device":
            return torch.device("cpu")
        return _served(self._meta_model(), name, exposed, self.model_type)

    def _meta_model(self) -> torch.nn.Module:
        """The model with every tensor on the meta device: its attributes without its weights (cached)."""
        if self._skeleton is None:
            if self.specs is None:
                raise ShimAttributeError("<attributes>", self.model_type, "this shim was built without tensor specs",
                                         "build shims with rewrite_pipeline")
            tensors = {n: torch.empty(shape, dtype=dt, device="meta") for n, (shape, dt) in self.specs.items()}
            self._skeleton = rebuild_model(self.model_ref.skeleton, tensors, self.model_ref.layouts)
        return self._skeleton

    def __repr__(self) -> str:
        return f"RemoteModel({self.model_type}, backend={self.model_ref.backend!r}, methods={self.method_names})"


def _signature(model: torch.nn.Module, name: str) -> inspect.Signature | None:
    try:
        return inspect.signature(getattr(model, name))
    except (TypeError, ValueError, AttributeError):
        return None


def _served(model: torch.nn.Module, name: str, exposed: tuple[str, ...], kind: str) -> Any:
    """``model.<name>`` read from the meta skeleton, or a ShimAttributeError saying why it cannot be served."""
    try:
        value = getattr(model, name)
    except AttributeError:
        raise AttributeError(f"{kind} has no attribute {name!r} (read through a rewrite_pipeline shim)") from None
    except Exception as exc:  # a property that computes with the weights
        raise ShimAttributeError(name, kind, f"computing it needs the weights ({type(exc).__name__}: {exc})",
                                 _NEEDS_WEIGHTS) from exc
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        raise ShimAttributeError(name, kind, f"it is a {type(value).__name__} holding weights, which stay in the "
                                 "object store (the shim serves attributes without tensor data: config, dtype, ...)",
                                 _NEEDS_WEIGHTS)
    if inspect.ismethod(value) and value.__self__ is model:
        raise ShimAttributeError(name, kind, f"method {name!r} is not exposed by this shim (exposed: {exposed})",
                                 f"pass method_names=(..., {name!r}) to rewrite_pipeline")
    return value


def _checked_methods(model: torch.nn.Module, method_names: Sequence[str]) -> tuple[str, ...]:
    """``method_names`` checked against the model (in the driver); ``"__call__"`` brings ``"forward"``."""
    names = list(dict.fromkeys(method_names))
    for name in names:
        if not callable(getattr(model, name, None)):
            public = sorted(n for n in dir(type(model)) if not n.startswith("_") and callable(getattr(type(model), n)))
            mine = [n for n in public if n not in dir(torch.nn.Module)] + ["__call__", "forward"]
            raise MethodNotFoundError(name, type(model).__qualname__, mine)
    if "__call__" in names and "forward" not in names:
        names.append("forward")
    return tuple(names)


def _shim(model: torch.nn.Module, method_names: Sequence[str], backend: str, remote_options: dict | None) -> RemoteModel:
    methods = _checked_methods(model, method_names)
    ref, split = prepare_split(model, backend)
    specs = {name: (tuple(t.shape), t.dtype) for name, t in split.weights.items()}  # (permuted ones stored flat)
    return RemoteModel(ref, methods, remote_options, specs, type(model).__qualname__)


def rewrite_pipeline(
    pipeline: Any,
    method_names: Sequence[str] = ("__call__",),
    backend: str = DEFAULT_BACKEND,
    model_attr_names: Sequence[str] | None = None,
    remote_options: dict | None = None,
) -> Any:
    """Return a shallow copy of ``pipeline`` whose models run as Ray tasks, loaded zero-copy.

    Works on plain objects holding models and on library pipelines (a ``transformers.pipeline``,
    a diffusers ``DiffusionPipeline``): the shims answer the attributes these read between calls.

    Args:
        pipeline: an object holding models as attributes (or a single ``nn.Module``).
        method_names: model methods the pipeline calls (``"__call__"`` covers ``model(x)`` and
            ``model.forward``); each must exist on every model (checked here, in the driver).
        backend: weight transport.
        model_attr_names: which attributes are models; default: every ``nn.Module`` attribute.
        remote_options: Ray task options for every call (e.g. ``{"num_cpus": 1}``).

    Returns:
        The rewritten pipeline (a :class:`RemoteModel` if ``pipeline`` is itself a model).

    Raises:
        NoModelsError: the pipeline holds no model.
        MethodNotFoundError: a name in ``method_names`` is not a method of a model.

    Example:
        >>> remote_pipe = rewrite_pipeline(pipe)  # doctest: +SKIP
        >>> remote_pipe(batch)  # each model call is a Ray task  # doctest: +SKIP
    """
    if isinstance(pipeline, torch.nn.Module) and model_attr_names is None:
        return _shim(pipeline, method_names, backend, remote_options)
    names = model_attrs(pipeline, model_attr_names)
    out = shallow_copy(pipeline)
    shims: dict[int, RemoteModel] = {}
    for name in names:
        model = get_attr(pipeline, name)
        if id(model) not in shims:
            shims[id(model)] = _shim(model, method_names, backend, remote_options)
        set_attr(out, name, shims[id(model)])
    return out
