"""Weights from checkpoint files: a model skeleton on the meta device, its tensors from safetensors files.

``prepare_model_for_actors(model, checkpoint=PATH)`` checks the checkpoint's names, shapes and
dtypes against the model (headers only), then hands the backend tensors that are views of the
files' pages (``safe_open`` maps the file; nothing is read into the heap), so the weights go from
the page cache straight into the object store. ``save_pretrained`` writes a tied weight once:
any name of a tie group found in the checkpoint fills the whole group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, cast

import torch
from safetensors import safe_open

from ray_zerocopy._tensors import SplitModel
from ray_zerocopy.backend import dtype_name
from ray_zerocopy.errors import CheckpointError, CheckpointMismatchError

Spec = tuple[str, tuple[int, ...]]  # (dtype name, shape)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(path: str | os.PathLike) -> dict[str, list[str]]:
    """The safetensors files of a checkpoint, and the tensor names each one should hold.

    Args:
        path: a ``.safetensors`` file, or a folder holding ``model.safetensors`` or
            ``model.safetensors.index.json`` and its shards.

    Returns:
        ``{file path: [tensor names]}``; the names are empty (unknown) where no index lists them.

    Raises:
        CheckpointError: the path does not exist, is not in one of these layouts, or its index is malformed.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(path, f"is a {p.suffix or 'suffix-less'} file, not a .safetensors file")
        return {str(p): []}
    if not p.is_dir():
        raise CheckpointError(path, "does not exist")
    if (p / INDEX).is_file():
        return _shards(p, p / INDEX)
    if (p / SINGLE).is_file():
        return {str(p / SINGLE): []}
    found = sorted(f.name for f in p.iterdir())[:10]
    raise CheckpointError(path, f"folder holds neither {INDEX} nor {SINGLE} (found: {', '.join(found) or 'nothing'})")


def _shards(folder: Path, index: Path) -> dict[str, list[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(index, f"is not a valid index ({type(exc).__name__}: {exc})") from None
    files: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        files.setdefault(str(folder / shard), []).append(name)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CheckpointError(index, f"lists shards that are not in the folder: {', '.join(missing[:5])}")
    return files


def read_specs(path: str | os.PathLike) -> dict[str, Spec]:
    """``{tensor name: (dtype name, shape)}`` of every tensor in the checkpoint (headers only).

    Raises:
        CheckpointError: as :func:`checkpoint_files`, or a tensor is in two files or not where the index says.
    """
    specs: dict[str, Spec] = {}
    for file, listed in checkpoint_files(path).items():
        tensors = open_file(file)
        if listed and set(listed) != set(tensors):
            odd = sorted(set(listed) ^ set(tensors))[:5]
            raise CheckpointError(file, f"holds other tensors than the index lists ({', '.join(odd)} ...)")
        for name, t in tensors.items():
            if name in specs:
                raise CheckpointError(file, f"holds tensor {name!r}, which another file of the checkpoint holds too")
            specs[name] = (dtype_name(t.dtype), tuple(t.shape))
    return specs


def open_file(file: str) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of the file's pages (nothing read yet)."""
    try:
        with safe_open(file, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        raise CheckpointError(file, f"cannot be read as safetensors ({type(exc).__name__}: {exc})") from None


def match(split: SplitModel, specs: Mapping[str, Spec], path: object) -> dict[str, str]:
    """Which checkpoint tensor fills each of the model's unique tensors, checked before anything is stored.

    A tie group (one tensor under several names) is filled by any of its names the checkpoint
    holds. Tensors the checkpoint lacks keep the model's data (non-persistent buffers), unless
    they are on the meta device.

    Returns:
        ``{canonical name: checkpoint name}``.

    Raises:
        CheckpointMismatchError: naming every missing, unexpected and mismatched tensor.
    """
    groups: dict[str, list[str]] = {name: [name] for name in split.weights}
    for alias, name in split.aliases.items():
        groups[name].append(alias)
    sources, missing, mismatched = {}, [], []
    for name, names in groups.items():
        found = next((s for n in names for s in saved_names(n) if s in specs), None)
        t = split.originals[name]
        if found is None:
            if t.is_meta:
                missing.append(" = ".join(names))
            continue
        sources[name] = found
        if specs[found] != (dtype_name(t.dtype), tuple(t.shape)):
            mismatched.append((found, (dtype_name(t.dtype), tuple(t.shape)), specs[found]))
    known = {*sources.values(), *(n for names in groups.values() for n in names)}
    unexpected = sorted(n for n in specs if n not in known and not metadata_only(n, split.adapted))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing, unexpected, mismatched)
    return sources


def saved_names(name: str) -> tuple[str, ...]:
    """The names a checkpoint may hold stored tensor ``name`` under: its own, and for an inner tensor of a
    quantized weight (``<module>.<weight>:<key>``, see ``tensor_adapters.py``) the names its library's
    ``save_pretrained`` gives it."""
    outer, sep, key = name.partition(":")
    if not sep:
        return (name,)
    module, _, weight = outer.rpartition(".")
    prefix = f"{module}." if module else ""
    return (name,
            outer if key == "data" else f"{outer}.{key}",  # bitsandbytes: weight, weight.absmax, weight.quant_map, ...
            f"{prefix}_{weight}_{key}",  # torchao's flatten_tensor_state_dict: _weight_qdata, _weight_scale, ...
            *([f"{prefix}SCB"] if key == "SCB" else []))  # bitsandbytes 8-bit: the row scales beside the weight


def metadata_only(name: str, adapted: Mapping[str, str]) -> bool:
    """True for a checkpoint entry of a quantized weight that holds no weight data, only settings that were
    read when the skeleton was built (bitsandbytes' packed ``quant_state``, its 8-bit ``weight_format``)."""
    outer, sep, _ = name.partition(".quant_state.bitsandbytes__")
    if sep:
        return outer in adapted
    return name.endswith(".weight_format") and name.removesuffix("_format") in adapted


def weights_from(path: str | os.PathLike, split_weights: Mapping[str, torch.Tensor | None],
                 sources: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors to store, in the split's order: views of the checkpoint's files where ``sources``
    names one, the model's own tensor elsewhere.

    Args:
        path: the checkpoint.
        split_weights: canonical name -> the model's contiguous tensor (``None`` or meta where the
            checkpoint fills it).
        sources: what :func:`match` returned.
    """
    opened: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        opened.update(open_file(file))
    # (a tensor is None or meta only where sources names its checkpoint tensor: see match)
    return {name: opened[sources[name]] if name in sources else cast(torch.Tensor, t) for name, t in split_weights.items()}
