"""Live weight updates: a loaded model takes the weights of a new version in place, without a restart.

The new version is loaded as any model is (the same options as the first load: CPU copy-on-write views of
the object store, or one fast copy to the GPU), then each tensor object of the live model is paired by name
with the new version's tensor of that name (:func:`paired_tensors`), every pair is checked before anything
is written, and the live tensors take the new data: on the CPU each Parameter/buffer object is pointed at
the new views (``.data``: the object, and whatever holds it, stays), on a GPU the bytes are copied into the
existing device memory (its address stays, so CUDA graphs and compiled kernels stay valid). The old
version's views go with their last reference, and with them this actor's hold on the old objects.

A model loaded with ``share_gpu=True`` maps a device copy that other actors map too, so nothing is written
into it: the new version gets a shared copy of its own (``gpu_share.shared_version``: the new ref's holder on
this GPU, started by the first actor that asks, mapped by the others), and each tensor object of the model is
pointed at the new copy (``.data``, like the CPU path; buffers at a private clone, as after a load). The old
copy is let go once the model no longer maps it, and freed by its holder when no actor does.

Calls that run while an update swaps can see a mix of versions only where the actor runs calls in threads
(Ray Serve runs sync methods in a thread pool): such a call holds :func:`hold_weights` for its duration.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Collection, Iterable, Iterator, Mapping, cast

import ray
import torch

from ray_zerocopy._tensors import named_plain_tensors, named_tensors
from ray_zerocopy.errors import UpdateMismatchError, UpdateNotSupportedError
from ray_zerocopy.gate import gate_of, unwrapped
from ray_zerocopy.load import LoadOptions, load_model, resolve_device
from ray_zerocopy.model_ref import ModelRef, as_model_ref
from ray_zerocopy.pipeline import get_attr, model_attrs
from ray_zerocopy.plugins import tensor_adapters

Pair = tuple[str, torch.Tensor, torch.Tensor]  # (name, the live model's tensor object, the new version's tensor)


def update_model_in_actor(model: torch.nn.Module, new_ref: ModelRef | Any) -> torch.nn.Module:
    """Give a loaded model the weights of a new version, in place: same module and parameter objects.

    The new version is fetched with the options the model was loaded with (device, dtype, private_copy,
    use_fast_load, share_gpu), and every tensor is checked against the model's before any is changed. On the
    CPU the parameters and buffers become copy-on-write views of the new version's shared copy (no copy; the
    old version's memory is released); on a GPU the new bytes are copied into the existing device tensors
    (``data_ptr`` unchanged, through one staging copy of the model on the GPU, or straight from the
    shared host memory where the GPU has no room for it). With ``share_gpu=True`` the tensors are pointed at
    the new version's one shared copy on this GPU (``data_ptr`` changes: see ``docs/updates.md``); the first
    actor on the GPU to update starts it, the others map it, and the old copy is freed once no actor maps it.

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
        UpdateNotSupportedError: the model is one of a pipeline's models prepared together (shared submodules)
            and was loaded with ``share_gpu=True`` (only from :func:`update_pipeline_in_actor`).
        WeightsLostError, InvalidModelRefError: as :func:`~ray_zerocopy.load.load_model_in_actor`.
        Exception: with ``share_gpu=True``, whatever kept the new version's holder from starting (e.g.
            ``torch.cuda.OutOfMemoryError`` in it: the GPU needs room for a second copy during the update).

    Example:
        >>> model = load_model_in_actor(ref_v1)  # doctest: +SKIP
        >>> update_model_in_actor(model, ref_v2)  # doctest: +SKIP
    """
    live = unwrapped(model)
    options = _options_of(live)
    versions = _Versions()
    try:
        new = versions.load(live, new_ref, options)
        versions.apply(live, [(live, new)])
    finally:
        versions.abort()  # (what an update that did not complete had attached to)
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
    refs = ray.get(new_refs) if isinstance(new_refs, ray.ObjectRef) else new_refs
    model_attrs(pipeline, list(refs))  # (raises for a name that is not a model attribute)
    lives = {name: unwrapped(get_attr(pipeline, name)) for name in refs}
    options = {name: _options_of(live) for name, live in lives.items()}  # (refusals before anything is loaded)
    loaded: dict[str, torch.nn.Module] = {}  # by uid: models prepared together are loaded together
    couples = []
    versions = _Versions()
    try:
        for name, given in refs.items():
            ref = as_model_ref(given)
            if ref.uid not in loaded:
                loaded[ref.uid] = versions.load(lives[name], dataclasses.replace(ref, member=None), options[name])
            new = loaded[ref.uid]
            couples.append((lives[name], new if ref.member is None else cast(torch.nn.ModuleList, new)[ref.member]))
        versions.apply(pipeline, couples)
    finally:
        versions.abort()
    return pipeline


def _options_of(model: torch.nn.Module) -> LoadOptions:
    """How the model was loaded (recorded by the load), else default options on its tensors' device.
    ``share_gpu`` stays on only where the model does map a shared copy (:func:`_maps_shared_copy`)."""
    if _maps_shared_copy(model) and vars(model).get("_rzc_via_root"):
        raise UpdateNotSupportedError(
            "the model is one of a pipeline's models prepared together (they share submodules), loaded with "
            "share_gpu=True: they map one shared device copy together, and moving one of them onto a new "
            "copy alone is not supported",
            "load that pipeline without share_gpu=True (a private device copy per actor), or give its models "
            "no shared submodules, or load the new version with load_pipeline_in_actor")
    options = vars(model).get("_rzc_options")
    if options is None:
        devices = {t.device for _, t, _ in named_tensors(model)} - {torch.device("meta")}
        options = LoadOptions(device=devices.pop() if len(devices) == 1 else None)
    if options.share_gpu and not _maps_shared_copy(model):  # (sharing fell back to a private copy at load)
        options = dataclasses.replace(options, share_gpu=False)
    return options


def _maps_shared_copy(model: torch.nn.Module) -> bool:
    """Whether the model was loaded with ``share_gpu=True`` and shares a device copy (its parameters are
    watched by the write guard; a first load may still be moving onto the holder's copy)."""
    return "_rzc_guard" in vars(model)


class _Versions:
    """The new versions one update loads. A model that maps a GPU's shared copy takes the new version's
    shared copy: its holder counts this process as a user from :meth:`load` on, and is let go again by
    :meth:`abort` unless :meth:`apply` completed (then the model is held by it instead of the old one)."""

    def __init__(self) -> None:
        self.moves: list[tuple[torch.nn.Module, Any]] = []  # (live model, the new version's holder)
        self.shared: list[torch.nn.Module] = []  # live models whose tensors are pointed at the new ones

    def load(self, live: torch.nn.Module, new_ref: Any, options: LoadOptions) -> torch.nn.Module:
        """The new version of ``live``, loaded as ``options`` say."""
        if not options.share_gpu:
            return _load_new(new_ref, options)
        from ray_zerocopy import gpu_share

        gpu_share.wait_shared(live)  # (a first load may still be moving onto the holder's copy: that move ends first)
        with torch.inference_mode(False):
            new, holder = gpu_share.shared_version(as_model_ref(new_ref), resolve_device(options.device),
                                                   options.dtype, as_parameters=not options.use_fast_load)
        self.moves.append((live, holder))
        self.shared.append(live)
        return new

    def apply(self, gated: Any, couples: list[tuple[torch.nn.Module, torch.nn.Module]]) -> None:
        """Check every pair, then swap them while no call holds ``gated``'s weights (:func:`hold_weights`)."""
        pairs, owners = _paired(couples)
        shared = {id(m) for m in self.shared}  # nothing is written into memory that other actors map: each
        repoint = {id(p[1]) for p, i in zip(pairs, owners) if id(couples[i][0]) in shared}  # tensor re-pointed
        with gate_of(gated).writing():
            old = swap(pairs, repoint)
            moves, self.moves = self.moves, []  # (from here on the models map the new copies)
            if retired := [t for t in old if t.device.type == "cpu"]:
                _retire(retired)
            del old, retired  # the old shared copies' mappings close here (swap waited for the work queued on them)...
            if not moves:
                return
            from ray_zerocopy import gpu_share

            for live, holder in moves:  # ...before their holders are let go
                gpu_share.move_to(live, holder)
                vars(live)["_rzc_guard"].reset(lambda h=holder: ray.get(h.restore.remote()))
            torch.cuda.empty_cache()  # (private buffers, or a copy of its own a first load kept, go back)

    def abort(self) -> None:
        """Let go of the new versions' holders that no model was moved onto (the update did not complete). They
        linger as after a last user (the other actors on the GPU are likely to try the same version)."""
        if not self.moves:
            return
        from ray_zerocopy import gpu_share

        for _, holder in self.moves:
            gpu_share.release(holder, os.getpid())
        self.moves = []


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
    return _paired(couples)[0]


def _paired(couples: Iterable[tuple[torch.nn.Module, torch.nn.Module]]) -> tuple[list[Pair], list[int]]:
    """:func:`paired_tensors`, and for each pair the index of the couple it is of."""
    pairs: list[Pair] = []
    owners: list[int] = []
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(live tensor) -> (first name, new tensor)
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[str, tuple], tuple[str, tuple]]] = []
    for index, (live, new) in enumerate(couples):
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
                owners.append(index)
    if missing or unexpected or mismatched:
        raise UpdateMismatchError(missing, unexpected, mismatched)
    return pairs, owners


def swap(pairs: list[Pair], repoint: Collection[int] = ()) -> list[torch.Tensor]:
    """Give each live tensor its new data: CPU tensors, and those whose ``id`` is in ``repoint``, view the new
    tensor (``.data``: the object stays, its address changes), other device tensors get the bytes copied in
    (same address). Where a re-pointing fails midway, the re-pointed tensors get their old data back.

    Returns:
        The old data of the re-pointed tensors (work queued on a GPU has run: they may be dropped).
    """
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    devices = set()
    try:
        with torch.no_grad():
            for _, live, new in pairs:
                if id(live) in repoint or (live.device.type == "cpu" and new.device.type == "cpu"):
                    done.append((live, live.data))
                    live.data = new.detach()
                else:
                    live.detach().copy_(new)
                devices.add(live.device)
    except BaseException:
        for live, old in done:
            live.data = old
        raise
    for dev in devices:
        if dev.type == "cuda":  # the staging copy is freed once every copy from it has run, and the old
            torch.cuda.synchronize(dev)  # data of a re-pointed tensor once every call queued on it has
    return [old for _, old in done]


RETIRE_S = 2.0  # how long an old version's CPU tensors outlive the swap


def _retire(old: list[torch.Tensor]) -> None:
    """Drop the old version's CPU tensors ``RETIRE_S`` from now, not at once: an op that another thread began
    on them before the swap (a call not inside :func:`hold_weights`) still reads their memory, which their last
    reference unmaps."""
    timer = threading.Timer(RETIRE_S, old.clear)
    # (not a daemon: a daemon thread that frees tensors while the interpreter finalizes aborts the process,
    # std::terminate from its forced unwinding; so an exiting process waits for it, at most RETIRE_S)
    timer.daemon = False
    timer.start()
