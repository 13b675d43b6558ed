"""Task-based sharing: each model call runs in a Ray task that loads the model zero-copy.

This is the ad-hoc mode (no long-lived actors): :func:`rewrite_pipeline` returns a
copy of a pipeline whose models are :class:`RemoteModel` shims. Loading costs
milliseconds, so every call loads afresh and no worker keeps weights pinned.
"""

from __future__ import annotations

from typing import Any, Sequence

import ray
import torch

from ray_zerocopy.actor import (
    DEFAULT_BACKEND,
    ModelRef,
    _model_attr_names,
    _set_attr,
    _shallow_copy,
    load_model_in_actor,
    prepare_model_for_actors,
)


@ray.remote
def _call_model(model_ref: ModelRef, method: str, args: tuple, kwargs: dict) -> Any:
    model = load_model_in_actor(model_ref)
    with torch.no_grad():
        return getattr(model, method)(*args, **kwargs)


class RemoteModel:
    """Stands in for a model: calling one of ``method_names`` runs it in a Ray task.

    Args:
        model_ref: the prepared model.
        method_names: the model methods that may be called through the shim.
        remote_options: options for the task (e.g. ``{"num_cpus": 1}``), see ``ray.remote``.
    """

    def __init__(self, model_ref: ModelRef, method_names: Sequence[str], remote_options: dict | None = None) -> None:
        self.model_ref = model_ref
        self.method_names = tuple(method_names)
        self.remote_options = dict(remote_options or {})

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Start ``model.<method>(*args, **kwargs)`` in a task; returns the result's ObjectRef."""
        if method not in self.method_names:
            raise AttributeError(
                f"method {method!r} is not exposed by this shim (exposed: {self.method_names}). "
                f"Fix: pass method_names=(..., {method!r}) to rewrite_pipeline."
            )
        task = _call_model.options(**self.remote_options) if self.remote_options else _call_model
        return task.remote(self.model_ref, method, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.call_async("__call__", *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name not in self.__dict__.get("method_names", ()):
            raise AttributeError(name)
        return lambda *args, **kwargs: ray.get(self.call_async(name, *args, **kwargs))

    def __repr__(self) -> str:
        return f"RemoteModel(backend={self.model_ref.backend!r}, methods={self.method_names})"


def rewrite_pipeline(
    pipeline: Any,
    method_names: Sequence[str] = ("__call__",),
    backend: str = DEFAULT_BACKEND,
    model_attr_names: Sequence[str] | None = None,
    remote_options: dict | None = None,
) -> Any:
    """Return a shallow copy of ``pipeline`` whose models run as Ray tasks, loaded zero-copy.

    Args:
        pipeline: an object holding models as attributes (or a single ``nn.Module``).
        method_names: model methods the pipeline calls (``"__call__"`` covers ``model(x)``).
        backend: weight transport.
        model_attr_names: which attributes are models; default: every ``nn.Module`` attribute.
        remote_options: Ray task options for every call (e.g. ``{"num_gpus": 1}``).

    Returns:
        The rewritten pipeline (a :class:`RemoteModel` if ``pipeline`` is itself a model).

    Raises:
        NoModelsError: the pipeline holds no model.

    Example:
        >>> remote_pipe = rewrite_pipeline(pipe)  # doctest: +SKIP
        >>> remote_pipe(batch)  # each model call is a Ray task  # doctest: +SKIP
    """
    if isinstance(pipeline, torch.nn.Module) and model_attr_names is None:
        return RemoteModel(prepare_model_for_actors(pipeline, backend=backend), method_names, remote_options)
    names = _model_attr_names(pipeline, model_attr_names)
    out = _shallow_copy(pipeline)
    shims: dict[int, RemoteModel] = {}
    for name in names:
        model = getattr(pipeline, name)
        if id(model) not in shims:
            ref = prepare_model_for_actors(model, backend=backend)
            shims[id(model)] = RemoteModel(ref, method_names, remote_options)
        _set_attr(out, name, shims[id(model)])
    return out
