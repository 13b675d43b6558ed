"""The CPU view engine under the backend SDK: tensors over a backend's bytes in shared memory, each
seen through a copy-on-write mapping (``_shm.py``), so that a write stays in the load that made it.

The public helpers in ``backend.py`` (``tensors_in_buffer``, ``tensors_in_arrays``, ``arrays_to_device``)
are thin: they describe where each tensor lies, and this module makes the views. Tensors that lie side by
side share one storage per run of one dtype; the buffers of one Ray object are found as one span.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Iterable, Mapping

import torch

from ray_zerocopy._dtypes import dtype_from_name
from ray_zerocopy._shm import PrivateViews, aligned_copy, private_buffer
from ray_zerocopy._stream import ALIGN, address_of


def array_offsets(arrays: Mapping[str, Any]) -> dict[str, int]:
    """Byte offset of each array (or buffer) from the ``ALIGN`` (64-byte) boundary at or below the lowest one. For
    the arrays of one Ray object they are the same in every process that gets it (the object's bytes are)."""
    addrs = {k: address_of(a) for k, a in arrays.items()}
    lo = min(addrs.values(), default=0) // ALIGN * ALIGN
    return {k: a - lo for k, a in addrs.items()}


def object_span(
    arrays: Mapping[str, Any], specs: Mapping[str, tuple], offsets: dict[str, int] | None,
) -> tuple[int, int, dict[str, int]] | None:
    """``(address, nbytes, offsets)`` of the span the non-empty arrays lie in, trusting ``offsets`` where its
    first and last entries match the arrays; None where the arrays are not one compact span."""
    def origin(k: str) -> int:  # where the offsets count from, according to array k
        return address_of(arrays[k]) - offsets[k]  # type: ignore[index]  # (called only while offsets is a dict)

    if offsets and origin(next(iter(offsets))) != origin(next(reversed(offsets))):
        offsets = None  # another layout than this object's
    trusted = bool(offsets)
    offsets = offsets or array_offsets({k: arrays[k] for k in specs if arrays[k].nbytes})
    if not offsets:
        return 0, 0, {}
    top = max(offsets, key=offsets.__getitem__)  # arrays do not overlap: the last to start ends last
    nbytes = offsets[top] + arrays[top].nbytes
    if not trusted and nbytes > sum(arrays[k].nbytes + ALIGN for k in offsets):
        return None
    return origin(top), nbytes, offsets


def one_by_one(arrays: Mapping[str, Any], specs: Mapping[str, tuple], marker: str) -> PrivateViews:
    """:func:`views` of each array alone (arrays that are not the buffers of one object)."""
    out = PrivateViews()
    for k, a in arrays.items():
        out.update(views(address_of(a), a.nbytes, a, [(k, *specs[k], 0)], marker))
    return out


def views(
    addr: int, nbytes: int, keep: Any, entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...], int]],
    marker: str,
) -> PrivateViews:
    """``(name, dtype, shape, byte offset from addr)`` -> contiguous tensors over the ``nbytes`` from
    ``addr``, seen through a copy-on-write mapping of their shared memory (``keep`` keeps them alive;
    see ``_shm.py``), or over a private copy where they are not in shared memory (an object small
    enough for Ray to keep in a process's heap, which a write must not change either).

    Each run of neighbouring tensors of one dtype shares one storage over exactly their bytes (from
    the run's first tensor to its last's end), and no two storages overlap: ``torch.save`` of a state
    dict then writes every byte once, whatever the dtypes, and a load makes one storage per run
    instead of one per tensor (about half the time).
    """
    found = private_buffer(addr, nbytes, keep, marker) if nbytes else None
    buf, skip = found if found is not None else aligned_copy(addr, nbytes)
    out = PrivateViews()
    entries = list(entries)
    for dtype, run in _runs(entries):
        first, end = run[0][2], run[-1][2] + math.prod(run[-1][1]) * dtype.itemsize
        base = torch.frombuffer(buf, dtype=dtype, count=(end - first) // dtype.itemsize, offset=skip + first)
        for name, shape, offset in run:
            out[name] = base.as_strided(shape, _strides(shape), (offset - first) // dtype.itemsize)
    for name, kind, shape, _ in entries:  # (empty: no bytes to share, and may not be aligned for its dtype)
        if name not in out:
            out[name] = torch.empty(shape, dtype=dtype_from_name(kind) if isinstance(kind, str) else kind)
    return out


def _runs(entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...], int]]) -> list[tuple[torch.dtype, list]]:
    """The non-empty entries as runs ``(dtype, [(name, shape, offset), ...])``: neighbours in rising offsets,
    of one dtype, each at a whole number of elements from the run's first."""
    runs: list[tuple[torch.dtype, list]] = []
    end = -1  # where the last run's last tensor ends
    for name, dtype, shape, offset in sorted(entries, key=operator.itemgetter(3)):
        dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        count = math.prod(shape)
        if not count:
            continue
        if not runs or runs[-1][0] is not dtype or offset < end or (offset - runs[-1][1][0][2]) % dtype.itemsize:
            runs.append((dtype, []))
        runs[-1][1].append((name, tuple(shape), offset))
        end = offset + count * dtype.itemsize
    return runs


@functools.lru_cache(maxsize=4096)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides (in elements) for ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
