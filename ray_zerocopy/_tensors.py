"""Tensor surgery: split a model into a weightless skeleton and its unique weights, and rebuild it.

The skeleton is the model pickled with every parameter and buffer replaced by a
persistent id (an index into the list of (canonical dotted name, is a Parameter) pickled
ahead of it), so the driver never copies a weight to build it, and an actor's unpickle
puts the shared-memory views straight into each module's ``_parameters`` / ``_buffers``.
Module states are set by :func:`_set_module_state` where ``Module.__setstate__`` would add
nothing (the header also names the attributes it adds in the driver's torch). Tied weights
(one tensor reachable under several names, or several tensors viewing the same bytes) are
stored once and come back as one object, so ties stay tied.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from ray import cloudpickle

from ray_zerocopy._refusals import PLAIN, check_module, check_tensor, refuse_unshared
from ray_zerocopy.errors import UnsupportedModelError

PersistentId = tuple[str, bool]  # (canonical name, is a Parameter)


@dataclass(frozen=True)
class SplitModel:
    """What the driver gets from :func:`split_model`."""

    skeleton: bytes  # the pickled module with no tensor data in it
    weights: dict[str, torch.Tensor]  # canonical name -> contiguous CPU tensor (unique storage)
    aliases: dict[str, str]  # every other name of a tied tensor -> its canonical name
    layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # name -> (shape, stride) of permuted tensors
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical name -> the model's tensor
    adapted: dict[str, str] = field(default_factory=dict)  # name of an adapted (quantized) tensor -> its type


def view_key(t: torch.Tensor) -> tuple:
    """Two tensors with the same key read the same bytes the same way: store them once."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _is_permuted_dense(t: torch.Tensor) -> bool:
    """True if ``t`` covers exactly ``numel`` consecutive elements in some dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Every parameter and buffer (persistent or not) under every name it is reachable by."""
    for name, p in model.named_parameters(remove_duplicate=False):
        yield name, p, True
    for name, b in model.named_buffers(remove_duplicate=False):
        yield name, b, False


def flat_tensors(name: str, t: torch.Tensor, adapters: Sequence[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(stored name, tensor)`` of what ``t`` is stored as: itself, or the inner tensors of an adapted one."""
    adapter = None if type(t) in PLAIN else next((a for a in adapters if a.handles(t)), None)
    if adapter is None:
        yield name, t
        return
    for key, inner in adapter.flatten(t)[0].items():
        yield from flat_tensors(f"{name}:{key}", inner, adapters)


def _plain_tensors(model: torch.nn.Module):
    """Tensors held as plain module attributes (not parameters or buffers: ``self.table = torch.randn(...)``,
    hook-based weight_norm's derived ``weight``), directly or in a list, tuple or dict attribute, by name."""
    for prefix, module in model.named_modules():
        for key, value in vars(module).items():
            if key in _ATTRS:  # _parameters, _buffers, _modules, hooks, ...
                continue
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, torch.Tensor):
                yield name, value
            elif isinstance(value, (list, tuple)):
                yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor))
            elif isinstance(value, dict):
                yield from ((f"{name}[{k!r}]", v) for k, v in value.items()
                            if isinstance(v, torch.Tensor) and isinstance(k, (str, int)) and "." not in str(k))


def _shareable(t: torch.Tensor) -> bool:
    """A plain tensor attribute that can travel as bytes (others stay in the skeleton, as pickled)."""
    return (type(t) in PLAIN and t.layout == torch.strided
            and not t.is_quantized and t.device.type != "meta" and t.nbytes > 0)


class _Splitter:
    """The unique weights of one model, and the persistent id of every tensor object put into its skeleton."""

    def __init__(self, adapters: Sequence[Any] = (), allow_meta: bool = False) -> None:
        self.adapters = adapters
        self.allow_meta = allow_meta  # (inner tensors of a quantized weight that a checkpoint fills: see hf.py)
        self.recipes: dict[int, tuple] = {}  # id of an adapted tensor -> the args of _rebuild_adapted
        self.adapted: dict[str, str] = {}  # name of an adapted tensor -> its type
        self.inner: set[str] = set()  # stored names that an adapted tensor is rebuilt from
        self.canonical: dict[tuple, str] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self.layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.pids: dict[PersistentId, int] = {}  # -> its index: the persistent id written into the skeleton
        self.ids: dict[int, int] = {}
        self.unnamed = 0
        self.names: dict[int, str] = {}  # id -> attribute name of plain tensors that cannot be shared
        self.bases: dict[tuple, list[torch.Tensor]] = {}  # (device, storage, dtype) -> stored dense tensors over it
        self.views: dict[int, tuple] = {}  # id of a tensor attribute viewing a stored one -> _rebuild_view's args
        self.unshared: list[torch.Tensor] = []  # tensors with data that the skeleton would carry
        self._keep_alive: list[torch.Tensor] = []  # ids are only unique while the objects live

    def add(self, name: str, t: torch.Tensor, is_param: bool) -> int:
        """Store ``t`` under ``name`` unless its bytes are stored already; its persistent id."""
        key = ("meta", id(t)) if t.is_meta else view_key(t)  # meta tensors share one null address
        first = self.canonical.setdefault(key, name)
        if first == name:
            data = self.originals[name] = t.detach()
            if not data.is_meta and not data.is_contiguous() and _is_permuted_dense(data):
                self.layouts[name] = (tuple(data.shape), data.stride())
                data = data.as_strided((data.numel(),), (1,), data.storage_offset())
            self.weights[name] = data if data.is_meta else data.cpu().contiguous()
            if not t.is_meta and (t.is_contiguous() or _is_permuted_dense(t)):  # (stored as exactly its bytes)
                self.bases.setdefault((t.device, t.untyped_storage().data_ptr(), t.dtype), []).append(t)
        elif name not in self.weights:
            self.aliases[name] = first
        pid = self.ids[id(t)] = self.pids.setdefault((first, is_param), len(self.pids))
        self._keep_alive.append(t)
        return pid

    def add_view(self, t: torch.Tensor) -> bool:
        """If ``t`` (a tensor attribute, not a parameter or buffer) reads bytes of a stored tensor in another
        way (``weight[:n]``, ``weight.t()``), record it as a view of that tensor: not stored again, and rebuilt
        in the actor over the loaded tensor's memory (see :func:`_rebuild_view`), as it was in the driver."""
        if t.is_meta or view_key(t) in self.canonical or t.numel() == 0:
            return False  # (the same view as a stored tensor: a tie, one object)
        lo = t.storage_offset()
        hi = lo + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
        for base in self.bases.get((t.device, t.untyped_storage().data_ptr(), t.dtype), ()):
            if base.storage_offset() <= lo and hi <= base.storage_offset() + base.numel():
                self.views[id(t)] = (base, tuple(t.shape), t.stride(), lo - base.storage_offset())
                self._keep_alive.append(t)
                return True
        return False

    def adapter_for(self, t: torch.Tensor) -> Any:
        """The first adapter that carries ``t`` (None for plain tensors, and for types none carries)."""
        return None if type(t) in PLAIN else next((a for a in self.adapters if a.handles(t)), None)

    def add_adapted(self, name: str, t: torch.Tensor, is_param: bool, adapter: Any) -> None:
        """Store the inner tensors of ``t`` (an adapted, e.g. quantized, tensor) as ``name:key``, nested
        ones recursively; the skeleton rebuilds ``t`` around them (see :func:`_rebuild_adapted`)."""
        if id(t) in self.recipes:  # a tie: the skeleton's pickle memo keeps it one object
            return
        inner, meta = adapter.flatten(t)
        for key, it in inner.items():
            sub = f"{name}:{key}"
            nested = self.adapter_for(it)
            if nested is not None:
                self.add_adapted(sub, it, is_param, nested)
                continue
            check_tensor(sub, it, self.allow_meta)
            self.add(sub, it, is_param)  # (is_param: shared like its parameter under share_gpu)
            self.inner.add(sub)
        self.recipes[id(t)] = (type(adapter).unflatten, inner, meta, is_param)
        self.adapted[name] = f"{type(t).__module__}.{type(t).__qualname__}"
        self._keep_alive.append(t)

    def add_unnamed(self, t: torch.Tensor) -> int | None:
        """A tensor the skeleton reaches only through other objects (found while pickling it): shared
        too, under a name of its own, if it can be."""
        if id(t) in self.recipes:
            return None
        adapter = self.adapter_for(t)
        if adapter is not None:
            self.unnamed += 1
            self.add_adapted(f"<tensor {self.unnamed}>", t, isinstance(t, torch.nn.Parameter), adapter)
            return None
        if not _shareable(t):
            if t.device.type != "meta" and t.numel() and all(x is not t for x in self.unshared):
                self.unshared.append(t)
            return None
        if self.add_view(t):
            return None  # (the pickler then reduces it with _rebuild_view)
        self.unnamed += 1
        return self.add(f"<tensor {self.unnamed}>", t, isinstance(t, torch.nn.Parameter))


def split_model(model: torch.nn.Module, allow_meta: bool = False, adapters: Sequence[Any] = (),
                with_skeleton: bool = True) -> SplitModel:
    """Split ``model`` into skeleton bytes and unique weights, without copying CPU weights.

    Parameters, buffers and tensors held in plain attributes (``self.table = torch.randn(...)``, or
    anywhere else the pickled module reaches) all become weights: shared, not copied into every actor.
    A permuted tensor (e.g. a transposed weight) is stored as its bytes in memory order
    and its strides are restored at load, so matmuls round exactly as in the driver.
    Other non-contiguous tensors are made contiguous, and GPU tensors are copied to the
    CPU (one copy each; the object store needs contiguous host bytes anyway).
    With ``allow_meta`` (weights that a checkpoint fills, see ``checkpoint.py``) tensors on the
    meta device are kept as they are, tied by identity; the caller replaces them.
    A tensor that one of ``adapters`` (``tensor_adapters.py``) carries, a quantized one, is stored as
    its plain inner tensors (``name:key``) and rebuilt around them on load.
    With ``with_skeleton=False`` the model is not pickled (the skeleton is empty; tensors that only pickling
    finds, reached through other objects, are missing): the weights of a new version of a prepared model.
    """
    split = _Splitter(adapters, allow_meta)
    for module_name, module in model.named_modules():
        check_module(module_name, module)
    for name, t, is_param in named_tensors(model):
        adapter = split.adapter_for(t)
        if adapter is not None:
            split.add_adapted(name, t, is_param, adapter)
            continue
        check_tensor(name, t, allow_meta)
        split.add(name, t, is_param)
    for name, t in _plain_tensors(model):
        if id(t) in split.ids or id(t) in split.recipes or id(t) in split.views:
            pass
        elif _shareable(t) and split.add_view(t):
            pass
        elif _shareable(t):
            split.add(name, t, isinstance(t, torch.nn.Parameter))
        elif (adapter := split.adapter_for(t)) is not None:
            split.add_adapted(name, t, isinstance(t, torch.nn.Parameter), adapter)
        split.names.setdefault(id(t), name)
    if not with_skeleton:
        return SplitModel(b"", split.weights, split.aliases, split.layouts, split.originals, split.adapted)
    modes = [(m, m.training) for m in model.modules()]
    try:  # pickle the skeleton in eval mode without calling train(): the caller's model is left as it was
        for m, _ in modes:
            m.training = False
        skeleton = _pickle_skeleton(model, split)
    finally:
        for m, mode in modes:
            m.training = mode
    if split.unshared:
        refuse_unshared(split.unshared[0], split.names.get(id(split.unshared[0])))
    return SplitModel(skeleton, split.weights, split.aliases, split.layouts, split.originals, split.adapted)


class _SkeletonPickler(cloudpickle.Pickler):
    """cloudpickle (so classes defined in ``__main__`` work) with weights swapped for persistent ids,
    and modules whose state :func:`_set_module_state` can set marked for it."""

    def __init__(self, file: io.BytesIO, ids: Mapping[int, int], split: _Splitter | None = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ids = ids
        self._split = split  # None: a trial pickle (no setter, nothing new shared)

    def persistent_id(self, obj: object) -> int | None:
        if obj is _set_module_state:
            return None if self._split is None else _SETTER  # (the actor picks which setter it is)
        if isinstance(obj, torch.Tensor):
            pid = self._ids.get(id(obj))
            if pid is not None or self._split is None or id(obj) in self._split.views:
                return pid
            return self._split.add_unnamed(obj)
        return None

    def reducer_override(self, obj: object) -> Any:
        if self._split is not None and isinstance(obj, torch.Tensor) and id(obj) in self._split.recipes:
            return _rebuild_adapted, self._split.recipes[id(obj)]
        if self._split is not None and isinstance(obj, torch.Tensor) and id(obj) in self._split.views:
            return _rebuild_view, self._split.views[id(obj)]
        if self._split is not None and isinstance(obj, torch.nn.Module) and type(obj).__setstate__ is _SETSTATE:
            rv = obj.__reduce_ex__(self.proto)  # (copyreg.__newobj__, (cls,), state, None, None)
            if isinstance(rv, tuple) and len(rv) == 5 and isinstance(rv[2], dict) and rv[2].keys() >= _ATTRS:
                return (*rv, _set_module_state)  # a 6th item: pickle calls it with (module, state)
        return super().reducer_override(obj)


_SETTER = -1  # the state setter's persistent id: the last object the actor's persistent_load holds
_SETSTATE = torch.nn.Module.__setstate__
_ATTRS = frozenset(torch.nn.Module().__dict__)  # what Module.__setstate__ adds where a state lacks it


def _set_module_state(module: torch.nn.Module, state: dict) -> None:
    """``Module.__setstate__`` for a state that has every attribute it would add: that Python function
    looks for a dozen attributes per module (~12% of rebuilding bert-base). Used where the actor's
    torch adds none that the driver's lacks."""
    if type(module).__setstate__ is _SETSTATE:
        module.__dict__.update(state)
    else:  # the actor's class has a __setstate__ of its own
        module.__setstate__(state)


def _plain_set_module_state(module: torch.nn.Module, state: dict) -> None:
    module.__setstate__(state)


def _dumps(obj: object, ids: Mapping[int, int], split: _Splitter | None = None) -> bytes:
    """The pickle of ``obj``; with ``split``, headed by the weights' (name, is a Parameter) by persistent
    id and Module's attributes here (written after the body: pickling it may share more tensors)."""
    body = io.BytesIO()
    _SkeletonPickler(body, ids, split).dump(obj)
    if split is None:
        return body.getvalue()
    header = (list(split.pids), _ATTRS, frozenset(split.inner), split.adapted)
    return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL) + body.getvalue()


def _pickle_skeleton(model: torch.nn.Module, split: _Splitter) -> bytes:
    try:
        return _dumps(model, split.ids, split)
    except Exception as exc:  # name the deepest submodule that fails, not just "the model"
        culprit = ""
        for name, sub in reversed(list(model.named_modules())):
            try:
                _dumps(sub, split.ids)
            except Exception:
                culprit = name
                break
        raise UnsupportedModelError(
            culprit, f"cannot be pickled ({type(exc).__name__}: {exc})",
            "make the module picklable (no open files, locks, lambdas bound to C objects, or compiled/"
            "scripted code); for torch.compile'd models prepare the original module (model._orig_mod)",
        ) from exc


_PARAM = torch.nn.Parameter


def weight_kinds(skeleton: bytes) -> list[tuple[str, bool]]:
    """``(stored name, is a Parameter)`` of every weight a skeleton takes (the first record of its pickle)."""
    return pickle.load(io.BytesIO(skeleton))[0]


def adapted_tensors(skeleton: bytes) -> dict[str, str]:
    """Name -> type of every adapted (e.g. quantized) tensor a skeleton rebuilds from inner tensors."""
    return pickle.load(io.BytesIO(skeleton))[3]


def _rebuild_adapted(unflatten: Any, inner: dict[str, torch.Tensor], meta: Any, is_param: bool) -> torch.Tensor:
    """An adapted tensor rebuilt (while the skeleton is unpickled) around its inner tensors, which are
    already in place: views of shared memory, or on the load device."""
    t = unflatten(inner, meta)
    return torch.nn.Parameter(t, requires_grad=False) if is_param and not isinstance(t, torch.nn.Parameter) else t


def _rebuild_view(base: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...], offset: int) -> torch.Tensor:
    """A tensor attribute that viewed a stored tensor in the driver, rebuilt (while the skeleton is unpickled)
    as the same view of the loaded tensor: it shares its memory, so a write to one shows in the other."""
    return base.detach().as_strided(shape, stride, base.storage_offset() + offset)


def laid(t: torch.Tensor, name: str, layouts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> torch.Tensor:
    """Stored tensor ``name`` with the strides its model gave it (see :attr:`SplitModel.layouts`)."""
    return t.as_strided(*layouts[name]) if name in layouts else t


def rebuild_model(
    skeleton: bytes,
    tensors: Mapping[str, torch.Tensor],
    layouts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    as_parameters: bool = True,
    placed: list[tuple[str, torch.Tensor]] | None = None,
) -> torch.nn.Module:
    """Unpickle ``skeleton`` with its weights taken from ``tensors`` (no copy); eval mode, no grad.

    ``layouts`` restores the strides of permuted tensors (see :func:`split_model`). With
    ``as_parameters=False`` parameters stay plain tensors (skips the ``nn.Parameter`` wrap).
    If ``placed`` is a list it receives ``(name, object)`` for each object put into the model
    (what the share_gpu write guard watches: ``guard_model(model, placed)``).
    """
    file = io.BytesIO(skeleton)
    pids, attrs, inner, _ = pickle.load(file)
    objects: list[Any] = []  # the weights by persistent id, then the state setter
    with torch.inference_mode(False):  # inference tensors would break autograd and hide in-place writes
        for name, is_param in pids:
            t = laid(tensors[name], name, layouts)
            # (inner tensors of an adapted parameter stay plain; _make_subclass: what Parameter() does, 3x faster)
            if is_param and as_parameters and name not in inner:
                t = torch.Tensor._make_subclass(_PARAM, t, False) if type(t) is torch.Tensor else _PARAM(t, False)
            objects.append(t)
        objects.append(_set_module_state if _ATTRS <= attrs else _plain_set_module_state)  # (frozensets: no copy)
        unpickler = pickle.Unpickler(file)
        unpickler.persistent_load = objects.__getitem__  # type: ignore[method-assign]  # (a C lookup per weight)
        model = unpickler.load()
    if placed is not None:
        placed += [(name, t) for (name, _), t in zip(pids, objects)]  # (zip stops before the setter)
    # every module was pickled in eval mode (see split_model): a root in train mode means a
    # __setstate__ of its own changed that; walking all modules per load would cost more than eval()
    return model.eval() if model.training else model


def cast_floating(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``dtype=`` on load: convert floating-point tensors where they now are (on the GPU after the raw copy)."""
    out = {}
    for name, t in tensors.items():
        new = t.to(dtype) if t.is_floating_point() else t
        if new.device.type != "cpu" and new.untyped_storage().nbytes() > new.nbytes:
            new = new.clone()  # a view of a transport's raw device buffer would keep all of it alive
        out[name] = new
    return out


def named_plain_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors held as plain module attributes (not parameters or buffers), by name (see ``split_model``)."""
    return _plain_tensors(model)
