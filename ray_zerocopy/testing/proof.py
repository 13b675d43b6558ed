"""The zero-copy proof: are a model's CPU tensors views of the node's shared memory? (Linux: ``/proc/self/maps``)"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ray_zerocopy import _procmaps
from ray_zerocopy._shm import STORE_MARKER


def shared_mappings(marker: str, writable: bool = False) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of shared memory whose path contains ``marker``: Ray's
    own (shared, writable; the only ones with ``writable``) and the copy-on-write ones of loads (private
    mappings of the same file: their pages are the file's until written, see ``_shm.py``)."""
    return [(m.start, m.end, m.path) for m in _procmaps.read()
            if m.path and marker in m.path and (m.shared_writable or not writable)]


def merged_mappings(marker: str) -> list[tuple[int, int]]:
    """Mappings of ``marker``'s shared memory, adjacent ones of one file merged (a mapping may show as
    several lines of /proc/self/maps)."""
    merged: list[tuple[int, int, str]] = []
    for lo, hi, path in sorted(shared_mappings(marker)):
        if merged and merged[-1][1] == lo and merged[-1][2] == path:
            merged[-1] = (merged[-1][0], hi, path)
        else:
            merged.append((lo, hi, path))
    return [(lo, hi) for lo, hi, _ in merged]


def unique_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` once (first name wins); an adapted (quantized) tensor as
    the inner tensors it is stored as (``name:key``)."""
    from ray_zerocopy._tensors import flat_tensors
    from ray_zerocopy.plugins import tensor_adapters

    adapters = tensor_adapters()
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            yield from flat_tensors(name, t, adapters)


def outside(tensors: dict[str, torch.Tensor], marker: str) -> list[str]:
    """Names of non-empty CPU tensors whose bytes are not inside one shared mapping of ``marker``."""
    maps = merged_mappings(marker)  # one mapping may show as several adjacent lines (split by mprotect)
    return [k for k, t in tensors.items() if t.nbytes and t.device.type == "cpu"
            and not any(a <= t.data_ptr() and t.data_ptr() + t.nbytes <= b for a, b in maps)]


def tensors_outside_shared_memory(model: nn.Module, marker: str = STORE_MARKER) -> list[str]:
    """Names of non-empty CPU tensors whose bytes do not lie inside Ray's shared object store.

    Linux only: reads ``/proc/self/maps``. An empty list proves every weight is a view of
    the node's shared memory (no private copy in this process).
    """
    return outside(dict(unique_tensors(model)), marker)
