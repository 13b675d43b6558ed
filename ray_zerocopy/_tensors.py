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
from typing import Mapping

import torch
from ray import cloudpickle

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


def _view_key(t: torch.Tensor) -> tuple:
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


def _check_tensor(name: str, t: torch.Tensor, allow_meta: bool = False) -> None:
    """Refuse, in the driver, tensors that cannot be carried as plain bytes."""
    plain = type(t) in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)
    module = name.rpartition(".")[0]
    if not plain:
        raise UnsupportedModelError(
            module, f"tensor {name!r} is a {type(t).__qualname__}, not a plain tensor",
            "materialize the model first (run a forward pass for lazy modules; remove parametrizations with "
            "torch.nn.utils.parametrize.remove_parametrizations; dequantize quantized models)",
        )
    if t.is_quantized or t.is_sparse or t.layout != torch.strided:
        raise UnsupportedModelError(
            module, f"tensor {name!r} has layout {t.layout} / quantized={t.is_quantized}",
            "convert it to a dense strided tensor (e.g. .dequantize() or .to_dense()) before preparing",
        )
    if t.device.type == "meta" and not allow_meta:
        raise UnsupportedModelError(
            module, f"tensor {name!r} is on the meta device and holds no data",
            "load real weights into the model (e.g. load_state_dict(..., assign=True)) before preparing",
        )


def _check_module(name: str, module: torch.nn.Module) -> None:
    """Refuse, in the driver, module kinds whose weights would not be shared (or not survive the split)."""
    kind = type(module).__module__
    if isinstance(module, torch.jit.ScriptModule):
        problem, fix = "is a TorchScript module (its weights live in compiled code, not in parameters)", (
            "prepare the eager nn.Module (before torch.jit.script/trace) and script it in the actor after loading")
    elif kind.startswith("torch._dynamo"):  # torch.compile's OptimizedModule
        problem, fix = "is a torch.compile'd module", (
            "prepare the original module (compiled._orig_mod) and call torch.compile on the loaded model in the actor")
    elif torch.nn.utils.parametrize.is_parametrized(module):
        problem, fix = "is parametrized (torch.nn.utils.parametrize / parametrizations.weight_norm)", (
            "bake the parametrization in first: torch.nn.utils.parametrize.remove_parametrizations(module, "
            f"{next(iter(module.parametrizations))!r}) (leave_parametrized=True is the default)")
    elif kind.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
        problem, fix = f"is a quantized module ({type(module).__qualname__}) whose packed weights are not tensors", (
            "prepare the float model and quantize it in the actor after loading, or dequantize it")
    else:
        return
    raise UnsupportedModelError(name, problem, fix)


def _named_tensors(model: torch.nn.Module):
    """Every parameter and buffer (persistent or not) under every name it is reachable by."""
    for name, t in model.named_parameters(remove_duplicate=False):
        yield name, t, True
    for name, t in model.named_buffers(remove_duplicate=False):
        yield name, t, False


def split_model(model: torch.nn.Module, allow_meta: bool = False) -> SplitModel:
    """Split ``model`` into skeleton bytes and unique weights, without copying CPU weights.

    A permuted tensor (e.g. a transposed weight) is stored as its bytes in memory order
    and its strides are restored at load, so matmuls round exactly as in the driver.
    Other non-contiguous tensors are made contiguous, and GPU tensors are copied to the
    CPU (one copy each; the object store needs contiguous host bytes anyway).
    With ``allow_meta`` (weights that a checkpoint fills, see ``checkpoint.py``) tensors on the
    meta device are kept as they are, tied by identity; the caller replaces them.
    """
    canonical: dict[tuple, str] = {}
    weights: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    originals: dict[str, torch.Tensor] = {}
    pids: dict[PersistentId, int] = {}  # -> its index: the persistent id written into the skeleton
    ids: dict[int, int] = {}
    keep_alive = []  # ids are only unique while the objects live
    for module_name, module in model.named_modules():
        _check_module(module_name, module)
    for name, t, is_param in _named_tensors(model):
        _check_tensor(name, t, allow_meta)
        key = ("meta", id(t)) if t.is_meta else _view_key(t)  # meta tensors share one null address
        first = canonical.setdefault(key, name)
        if first == name:
            data = originals[name] = t.detach()
            if not data.is_meta and not data.is_contiguous() and _is_permuted_dense(data):
                layouts[name] = (tuple(data.shape), data.stride())
                data = data.as_strided((data.numel(),), (1,), data.storage_offset())
            weights[name] = data if data.is_meta else data.cpu().contiguous()
        elif name not in weights:
            aliases[name] = first
        ids[id(t)] = pids.setdefault((first, is_param), len(pids))
        keep_alive.append(t)
    modes = [(m, m.training) for m in model.modules()]
    try:  # pickle the skeleton in eval mode without calling train(): the caller's model is left as it was
        for m, _ in modes:
            m.training = False
        skeleton = _pickle_skeleton(model, ids, list(pids))
    finally:
        for m, mode in modes:
            m.training = mode
    return SplitModel(skeleton, weights, aliases, layouts, originals)


class _SkeletonPickler(cloudpickle.Pickler):
    """cloudpickle (so classes defined in ``__main__`` work) with weights swapped for persistent ids,
    and modules whose state :func:`_set_module_state` can set marked for it."""

    def __init__(self, file: io.BytesIO, ids: Mapping[int, int], setter: int | None = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ids = ids
        self._setter = setter  # the persistent id of the state setter (the actor picks which one it is)

    def persistent_id(self, obj: object) -> int | None:
        if obj is _set_module_state:
            return self._setter
        return self._ids.get(id(obj)) if isinstance(obj, torch.Tensor) else None

    def reducer_override(self, obj: object) -> object:
        if self._setter is not None and isinstance(obj, torch.nn.Module) and type(obj).__setstate__ is _SETSTATE:
            rv = obj.__reduce_ex__(self.proto)  # (copyreg.__newobj__, (cls,), state, None, None)
            if isinstance(rv, tuple) and len(rv) == 5 and isinstance(rv[2], dict) and rv[2].keys() >= _ATTRS:
                return (*rv, _set_module_state)  # a 6th item: pickle calls it with (module, state)
        return super().reducer_override(obj)


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


def _dumps(obj: object, ids: Mapping[int, int], pids: list[PersistentId] | None = None) -> bytes:
    buf = io.BytesIO()
    if pids is not None:  # first the weights' (name, is a Parameter) by index and Module's attributes here
        pickle.dump((pids, _ATTRS), buf, protocol=pickle.HIGHEST_PROTOCOL)
    _SkeletonPickler(buf, ids, None if pids is None else len(pids)).dump(obj)
    return buf.getvalue()


def _pickle_skeleton(model: torch.nn.Module, ids: Mapping[int, int], pids: list[PersistentId]) -> bytes:
    try:
        return _dumps(model, ids, pids)
    except Exception as exc:  # name the deepest submodule that fails, not just "the model"
        culprit = ""
        for name, sub in reversed(list(model.named_modules())):
            try:
                _dumps(sub, ids)
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
    pids, attrs = pickle.load(file)
    objects = []
    with torch.inference_mode(False):  # inference tensors would break autograd and hide in-place writes
        for name, is_param in pids:
            t = tensors[name]
            if name in layouts:
                t = t.as_strided(*layouts[name])
            if is_param and as_parameters:  # _make_subclass: what Parameter() does for a plain tensor, 3x faster
                t = torch.Tensor._make_subclass(_PARAM, t, False) if type(t) is torch.Tensor else _PARAM(t, False)
            objects.append(t)
        objects.append(_set_module_state if _ATTRS <= attrs else _plain_set_module_state)  # (frozensets: no copy)
        unpickler = pickle.Unpickler(file)
        unpickler.persistent_load = objects.__getitem__  # (a C lookup per weight, no Python call)
        model = unpickler.load()
    if placed is not None:
        placed += [(name, t) for (name, _), t in zip(pids, objects)]  # (zip stops before the setter)
    # every module was pickled in eval mode (see split_model): a root in train mode means a
    # __setstate__ of its own changed that; walking all modules per load would cost more than eval()
    return model.eval() if model.training else model
