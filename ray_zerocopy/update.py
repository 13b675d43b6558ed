"""Live weight updates: a loaded model takes the weights of a new version in place, without a restart.

The new version is loaded as any model is (the same options as the first load: CPU copy-on-write views of
the object store, or one fast copy to the GPU), then each tensor object of the live model is paired by name
with the new version's tensor of that name (:func:`paired_tensors`), every pair is checked before anything
is written, and the live tensors take the new data: on the CPU each Parameter/buffer object is pointed at
the new views (``.data``: the object, and whatever holds it, stays), on a GPU the bytes are copied into the
existing device memory (its address stays, so CUDA graphs and compiled kernels stay valid). The old
version's views go with their last reference, and with them this actor's hold on the old objects.

Calls that run while an update swaps can see a mix of versions only where the actor runs calls in threads
(Ray Serve runs sync methods in a thread pool): such a call holds :func:`hold_weights` for its duration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from typing import Any, Iterable, Iterator, Mapping, cast

import torch

from ray_zerocopy._tensors import named_plain_tensors, named_tensors
from ray_zerocopy.errors import UpdateMismatchError, UpdateNotSupportedError
from ray_zerocopy.load import LoadOptions, load_model
from ray_zerocopy.model_ref import ModelRef, as_model_ref
from ray_zerocopy.pipeline import get_attr, model_attrs
from ray_zerocopy.plugins import tensor_adapters

Pair = tuple[str, torch.Tensor, torch.Tensor]  # (name, the live model's tensor object, the new version's tensor)


def update_model_in_actor(model: torch.nn.Module, new_ref: ModelRef | Any) -> torch.nn.Module:
    """Give a loaded model the weights of a new version, in place: same module and parameter objects.

    The new version is fetched with the options the model was loaded with (device, dtype, private_copy,
    use_fast_load), and every tensor is checked against the model's before any is changed. On the CPU the
    parameters and buffers become copy-on-write views of the new version's shared copy (no copy; the old
    version's memory is released); on a GPU the new bytes are copied into the existing device tensors
    (``data_ptr`` unchanged, through one staging copy of the model on the GPU, or straight from the
    shared host memory where the GPU has no room for it).

    Args:
        model: a model returned by :func:`~ray_zerocopy.load.load_model_in_actor` (or a ``torch.compile``
            wrapper of one); a model built otherwise is updated as if loaded with default options on its
            parameters' device.
        new_ref: the new version's :class:`~ray_zerocopy.model_ref.ModelRef` (or an ObjectRef to it), from
            ``prepare_model_for_actors`` (``like=`` the previous ref: only weights are put).

    Returns:
        ``model`` itself, now holding the new weights.

    Raises:
        UpdateMismatchError: the new version's tensor names, shapes, dtypes or ties differ (named); the model
            keeps its previous weights.
        UpdateNotSupportedError: the model was loaded with ``share_gpu=True`` (not supported yet).
        WeightsLostError, InvalidModelRefError: as :func:`~ray_zerocopy.load.load_model_in_actor`.

    Example:
        >>> model = load_model_in_actor(ref_v1)  # doctest: +SKIP
        >>> update_model_in_actor(model, ref_v2)  # doctest: +SKIP
    """
    live = _unwrapped(model)
    options = _options_of(live)
    new = _load_new(new_ref, options)
    pairs = paired_tensors([(live, new)])
    with _gate(live).writing():
        swap(pairs)
    return model


def update_pipeline_in_actor(pipeline: Any, new_refs: Mapping[str, ModelRef] | Any) -> Any:
    """:func:`update_model_in_actor` for the models of a pipeline loaded by ``load_pipeline_in_actor``.

    Args:
        pipeline: the pipeline that ``load_pipeline_in_actor`` returned.
        new_refs: ``{attribute name: ModelRef}`` of the new versions (``rewrite_pipeline_for_actors`` of the new
            pipeline, or an ObjectRef to that dict); attributes left out keep their weights.

    Returns:
        ``pipeline`` itself. Every model is checked before any is changed (all or none are updated).

    Raises:
        UpdateMismatchError, UpdateNotSupportedError, WeightsLostError: as :func:`update_model_in_actor`.
        NotAModuleError: a name in ``new_refs`` is not a model attribute of ``pipeline``.

    Example:
        >>> skeleton, refs_v2 = rewrite_pipeline_for_actors(new_pipe)  # driver  # doctest: +SKIP
        >>> update_pipeline_in_actor(pipe, refs_v2)  # actor  # doctest: +SKIP
    """
    import ray

    refs = ray.get(new_refs) if isinstance(new_refs, ray.ObjectRef) else new_refs
    model_attrs(pipeline, list(refs))  # (raises for a name that is not a model attribute)
    loaded: dict[str, torch.nn.Module] = {}  # by uid: models prepared together are loaded together
    couples = []
    for name, given in refs.items():
        ref = as_model_ref(given)
        live = _unwrapped(get_attr(pipeline, name))
        if ref.uid not in loaded:
            loaded[ref.uid] = _load_new(dataclasses.replace(ref, member=None), _options_of(live))
        new = loaded[ref.uid]
        couples.append((live, new if ref.member is None else cast(torch.nn.ModuleList, new)[ref.member]))
    pairs = paired_tensors(couples)
    with _gate(pipeline).writing():
        swap(pairs)
    return pipeline


def _unwrapped(model: Any) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the module it compiled


def _options_of(model: torch.nn.Module) -> LoadOptions:
    """How the model was loaded (recorded by the load), else default options on its tensors' device."""
    if "_rzc_guard" in vars(model):
        raise UpdateNotSupportedError(
            "the model maps a GPU copy shared with other actors (loaded with share_gpu=True), and updating "
            "that copy under the other actors' calls is not supported yet",
            "load it without share_gpu=True (a private device copy per actor), or start new actors on the new ref")
    options = vars(model).get("_rzc_options")
    if options is None:
        devices = {t.device for _, t, _ in named_tensors(model)} - {torch.device("meta")}
        options = LoadOptions(device=devices.pop() if len(devices) == 1 else None)
    return options


def _load_new(new_ref: Any, options: LoadOptions) -> torch.nn.Module:
    """The new version, loaded as ``options`` say; where the GPU has no room for a staging copy, CPU views
    (each tensor is then copied from shared host memory into the live device tensor)."""
    try:
        return load_model(new_ref, options)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return load_model(new_ref, dataclasses.replace(options, device=None))


def _named(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor object of a model under every name: parameters, buffers, plain tensor attributes; an
    adapted (quantized) tensor also as its inner tensors (see :func:`_with_inner`)."""
    adapters = tensor_adapters()
    for name, t, _ in named_tensors(model):  # (remove_duplicate=False: a tied tensor under each of its names)
        yield from _with_inner(name, t, adapters)
    for name, t in named_plain_tensors(model):
        yield from _with_inner(name, t, adapters)


def _with_inner(name: str, t: torch.Tensor, adapters: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``t``, and the inner tensors an adapter stores it as (``name:key``), recursively. A wrapper subclass
    (torchao, optimum-quanto) holds no bytes of its own: only its inner tensors take the new data. A
    Parameter subclass with extra tensors (bitsandbytes) takes new data itself, and so do its extra tensors."""
    adapter = next((a for a in adapters if a.handles(t)), None) if type(t) not in _PLAIN else None
    if adapter is None or not hasattr(type(t), "__tensor_flatten__"):
        yield name, t
    if adapter is not None:
        for key, inner in adapter.flatten(t)[0].items():
            yield from _with_inner(f"{name}:{key}", inner, adapters)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _spec(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return str(t.dtype).removeprefix("torch."), tuple(t.shape)


def paired_tensors(couples: Iterable[tuple[torch.nn.Module, torch.nn.Module]]) -> list[Pair]:
    """Pair every tensor object of each live model with the new version's tensor of the same name.

    Each live object appears once (a tie is paired once, and must be one tensor in the new version too).
    Wrapper tensor subclasses are paired here too, as one object each (their inner tensors travel with them).

    Args:
        couples: ``(live model, new version)`` pairs, e.g. one per model of a pipeline.

    Returns:
        ``(name, live tensor, new tensor)`` for every distinct live tensor object.

    Raises:
        UpdateMismatchError: names, shapes, dtypes or ties differ (every difference listed, nothing changed).

    Example:
        >>> pairs = paired_tensors([(model, new_version)])  # doctest: +SKIP
    """
    pairs: list[Pair] = []
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(live tensor) -> (first name, new tensor)
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[str, tuple], tuple[str, tuple]]] = []
    for live, new in couples:
        old_named, new_named = dict(_named(live)), dict(_named(new))
        missing += [n for n in old_named if n not in new_named]
        unexpected += [n for n in new_named if n not in old_named]
        for name, t in old_named.items():
            u = new_named.get(name)
            if u is None:
                continue
            if _spec(t) != _spec(u):
                mismatched.append((name, _spec(t), _spec(u)))
            elif id(t) in seen:
                first, tied = seen[id(t)]
                if tied is not u:  # one object in the model, two in the new version: the tie would break
                    mismatched.append((name, ("tied to", (first,)), ("untied from", (first,))))
            else:
                seen[id(t)] = (name, u)
                pairs.append((name, t, u))
    if missing or unexpected or mismatched:
        raise UpdateMismatchError(missing, unexpected, mismatched)
    return pairs


def swap(pairs: list[Pair]) -> None:
    """Give each live tensor its new data: CPU tensors view the new bytes (``.data``), device tensors get
    them copied in (same address). Where a CPU swap fails midway, the swapped tensors get their old data back."""
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    devices = set()
    try:
        with torch.no_grad():
            for _, live, new in pairs:
                if live.device.type == "cpu" and new.device.type == "cpu":
                    done.append((live, live.data))
                    live.data = new.detach()
                else:
                    live.detach().copy_(new)
                    devices.add(live.device)
    except BaseException:
        for live, old in done:
            live.data = old
        raise
    _retire([old for _, old in done])
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the staging copy is freed once every copy from it has run


RETIRE_S = 2.0  # how long an old version's CPU tensors outlive the swap


def _retire(old: list[torch.Tensor]) -> None:
    """Drop the old version's CPU tensors ``RETIRE_S`` from now, not at once: an op that another thread began
    on them before the swap (a call not inside :func:`hold_weights`) still reads their memory, which their last
    reference unmaps."""
    timer = threading.Timer(RETIRE_S, old.clear)
    timer.daemon = True
    timer.start()


class _Gate:
    """Many calls hold the weights at once; an update waits for them, and new calls wait for the update."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.readers = 0
        self.updating = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.updating)
            self.readers += 1
        try:
            yield
        finally:
            with self.cond:
                self.readers -= 1
                self.cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.updating)
            self.updating = True  # (new calls wait from now: an update is not starved by a stream of calls)
            self.cond.wait_for(lambda: self.readers == 0)
        try:
            yield
        finally:
            with self.cond:
                self.updating = False
                self.cond.notify_all()


_gates: weakref.WeakKeyDictionary[Any, _Gate] = weakref.WeakKeyDictionary()
_pinned_gates: dict[int, tuple[Any, _Gate]] = {}  # objects that take no weak reference (or no hash): kept
_gates_lock = threading.Lock()


def _gate(obj: Any) -> _Gate:
    obj = _unwrapped(obj)
    with _gates_lock:
        try:
            return _gates.setdefault(obj, _Gate())
        except TypeError:
            return _pinned_gates.setdefault(id(obj), (obj, _Gate()))[1]


def hold_weights(model: Any) -> contextlib.AbstractContextManager[None]:
    """Keep the weights of ``model`` (or a pipeline) from changing while the block runs.

    An update of the same object (``update_model_in_actor(model, ...)``, ``update_pipeline_in_actor(pipe, ...)``)
    waits until every block that holds it has ended, and blocks that start meanwhile wait until the update
    is done: a call inside the block sees one version only. Needed only where calls run in threads next to an
    update (Ray Serve's sync methods, actors with ``max_concurrency`` > 1); a plain Ray actor runs one method
    at a time. Blocks do not wait for each other. Do not update the model from inside its own block (it
    would wait for itself).

    Args:
        model: the object that updates are applied to (the loaded model, its ``torch.compile`` wrapper, or
            the pipeline).

    Returns:
        A context manager.

    Example:
        >>> with hold_weights(self.model):  # doctest: +SKIP
        ...     out = self.model.generate(ids)
    """
    return _gate(model).reading()
