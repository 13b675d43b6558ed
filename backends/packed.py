"""The ``packed`` transport: every tensor in one contiguous, aligned uint8 buffer, plus a small index.

One ``ray.put``, one object, one ``ray.get``. The driver never assembles the buffer: it is
written into the object store from views of the tensors (``put_joined``). Each tensor starts at a multiple of
``ALIGN`` bytes inside the buffer (Ray places the buffer itself on a 64-byte boundary),
so every view is aligned for any dtype and for vectorized kernels. For a GPU the whole
buffer goes to the device in one :func:`ray_zerocopy.buffer_to_device` call and the
tensors are sliced out of the device copy: one large transfer instead of hundreds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import ray
import torch

from ray_zerocopy.backend import (
    ALIGN,  # 64 bytes; a cache line, and what Ray guarantees for the buffer start
    Backend,
    buffer_to_device,
    dtype_from_name,
    dtype_name,
    hookimpl,
    put_joined,
    quiet_readonly,
    tensor_to_bytes,
    tensors_in_buffer,
)
from ray_zerocopy.errors import PayloadError

# name, dtype name, shape, byte offset in the buffer, byte length
IndexEntry = tuple[str, str, tuple[int, ...], int, int]


@dataclass(frozen=True)
class PackedPayload:
    ref: ray.ObjectRef  # -> np.ndarray(uint8) holding every tensor
    nbytes: int
    index: tuple[IndexEntry, ...]


def layout(weights: Mapping[str, torch.Tensor]) -> tuple[tuple[IndexEntry, ...], int]:
    """Where each tensor goes in the buffer, and the buffer's total size: tensors of 16 KiB or more in the
    given order, then the smaller ones (``put_joined`` copies those into a few pieces, and an object of
    fewer pieces is faster to ``ray.get``)."""
    index, offset = [], 0
    for name, t in sorted(weights.items(), key=lambda item: item[1].nbytes < 16 * 1024):
        index.append((name, dtype_name(t.dtype), tuple(t.shape), offset, t.nbytes))
        offset += -(-t.nbytes // ALIGN) * ALIGN
    return tuple(index), offset


def pack(weights: Mapping[str, torch.Tensor], index: tuple[IndexEntry, ...], nbytes: int) -> np.ndarray:
    """Copy every tensor into one new uint8 buffer (the driver's only copy), padding zeroed."""
    buf = np.empty(nbytes, dtype=np.uint8)
    out = torch.from_numpy(buf)
    for name, _, _, offset, size in index:
        end = -(-size // ALIGN) * ALIGN + offset
        if size:  # torch's copy is multi-threaded for large tensors, numpy's is not
            out[offset : offset + size].copy_(weights[name].reshape(-1).view(torch.uint8))
        out[offset + size : end].zero_()  # deterministic bytes: the same model packs to the same buffer
    return buf


def segments(weights: Mapping[str, torch.Tensor], index: tuple[IndexEntry, ...]) -> Iterator[np.ndarray]:
    """The bytes of :func:`pack`'s buffer in order, as views of the tensors and zeroed padding: the
    object store receives them without the driver assembling the buffer (``put_joined``)."""
    for name, _, _, _, size in index:
        yield tensor_to_bytes(weights[name])
        yield np.zeros(-size % ALIGN, dtype=np.uint8)


def check_index(index: object, nbytes: int) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """Validate the index against the buffer size before any view is made.

    Raises:
        PayloadError: an entry is malformed, has an unknown dtype, a wrong size, or lies outside the buffer.
    """
    if not isinstance(index, tuple):
        raise PayloadError(None, f"index must be a tuple of entries, got {type(index).__qualname__}")
    checked = []
    for entry in index:
        if not (isinstance(entry, tuple) and len(entry) == 5 and isinstance(entry[0], str)):
            raise PayloadError(None, f"index entry {entry!r:.200} is not (name, dtype, shape, offset, size)")
        name, dtype, shape, offset, size = entry
        try:
            torch_dtype = dtype_from_name(dtype)
        except (ValueError, TypeError):
            raise PayloadError(name, f"unknown dtype {dtype!r:.50}") from None
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise PayloadError(name, f"shape must be a tuple of non-negative integers, got {shape!r:.100}")
        if math.prod(shape) * torch_dtype.itemsize != size:
            raise PayloadError(name, f"size {size} does not match shape {tuple(shape)} of {dtype}")
        if type(offset) is not int or offset < 0 or offset % ALIGN or offset + size > nbytes:
            raise PayloadError(name, f"offset {offset!r} is unaligned or runs past the {nbytes}-byte buffer")
        checked.append((name, torch_dtype, tuple(shape), offset, size))
    return checked


@functools.lru_cache(maxsize=16)
def _checked_index(index: tuple, nbytes: int) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """:func:`check_index`, once per distinct index: a reload in the same process skips it."""
    return check_index(index, nbytes)


class PackedBackend(Backend):
    name = "packed"

    def put(self, weights: Mapping[str, torch.Tensor]) -> PackedPayload:
        index, nbytes = layout(weights)
        return PackedPayload(put_joined(segments(weights, index)), nbytes, index)

    def get(self, payload: PackedPayload, device: torch.device) -> dict[str, torch.Tensor]:
        if not isinstance(payload, PackedPayload):
            raise PayloadError(None, f"expected a PackedPayload, got {type(payload).__qualname__}")
        try:
            entries = _checked_index(payload.index, payload.nbytes)
        except TypeError:  # unhashable: malformed, check_index names what is wrong
            entries = check_index(payload.index, payload.nbytes)
        buf = ray.get(payload.ref)
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or len(buf) != payload.nbytes:
            raise PayloadError(None, f"stored object is not the {payload.nbytes}-byte uint8 buffer that was put")
        with quiet_readonly():
            if device.type == "cpu":
                return tensors_in_buffer(buf, [(name, dtype, shape, off) for name, dtype, shape, off, _ in entries])
            base = buffer_to_device(torch.from_numpy(buf), device, wait=False)  # (views only)
        return {name: base[off : off + size].view(dtype).view(shape) for name, dtype, shape, off, size in entries}


@hookimpl
def register_backends(register):
    register(PackedBackend)
