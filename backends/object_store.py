"""The default transport: one object in Ray's object store holding each tensor's bytes as one buffer.

The buffers stay out of band in Ray's serializer, laid out as it lays out numpy arrays
(64-byte aligned, zero-copy on get), so an actor's ``ray.get`` returns read-only buffers
that point into the node's shared memory, and each tensor is a view of one of them.
Every tensor travels as raw bytes plus its dtype name, so bfloat16 and fp8 work
although numpy lacks them.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import ray
import torch

from ray_zerocopy.backend import (
    ALIGN,
    Backend,
    array_offsets,
    arrays_to_device,
    dtype_from_name,
    hookimpl,
    spec_of,
    tensor_to_bytes,
    tensors_in_arrays,
)


@dataclass(frozen=True)
class ObjectStorePayload:
    ref: ray.ObjectRef  # -> dict[name, buffer of the tensor's bytes]
    specs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype name, shape)
    offsets: dict[str, int] | None = None  # name -> where Ray put its buffer in the object (array_offsets)
    small: dict[str, int] | None = None  # name -> offset in the SMALL buffer, for tensors of under SMALL_BYTES


# Ray aligns an out-of-band buffer of under 2048 bytes to 8 bytes only, and CPU kernels round differently for
# misaligned operands: such tensors travel together in one buffer of at least 2048 bytes, each at a multiple of 64.
SMALL_BYTES = 2048
SMALL = "\0small"  # (its key in the object; no qualified name holds a NUL)


def _glue(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], np.ndarray]:
    """The offsets of the small tensors in one 64-byte aligned layout, and that buffer (their bytes copied)."""
    offsets, end = {}, 0
    for k, t in weights.items():
        if 0 < t.nbytes < SMALL_BYTES:
            offsets[k] = end
            end += -(-t.nbytes // ALIGN) * ALIGN
    buf = np.zeros(max(end, SMALL_BYTES), np.uint8)
    for k, off in offsets.items():
        buf[off : off + weights[k].nbytes] = tensor_to_bytes(weights[k].contiguous())
    return offsets, buf


def _unglue(arrays: Any, small: dict[str, int] | None, specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict:
    """The object's buffers by tensor name: the small tensors as slices of their shared buffer."""
    if small:
        glue = memoryview(arrays.pop(SMALL))
        for k, off in small.items():
            dtype, shape = specs[k]
            arrays[k] = glue[off : off + math.prod(shape) * dtype_from_name(dtype).itemsize]
    return arrays


class _Buffers(dict):
    """name -> the PickleBuffer of a tensor's bytes. Ray's serializer takes a dict subclass as one
    pickle (protocol 5, each buffer out of band, 64-byte aligned, as it stores a numpy array), where a
    plain dict goes through msgpack with a Python call per value. ``ray.get`` then gives a plain dict of
    read-only buffers into the object, made by one C call and no numpy array per tensor (faster than a
    dict of numpy arrays). Only the driver needs this."""

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


class ObjectStoreBackend(Backend):
    name = "object_store"

    def put(self, weights: Mapping[str, torch.Tensor]) -> ObjectStorePayload:
        # (numpy's stubs give ndarray the buffer protocol's __buffer__ only for Python >= 3.12)
        small, glue = _glue(weights)
        buffers = {k: pickle.PickleBuffer(tensor_to_bytes(t))  # type: ignore[arg-type]
                   for k, t in weights.items() if k not in small}
        if small:
            buffers[SMALL] = pickle.PickleBuffer(glue)  # type: ignore[arg-type]
        client = ray.util.client.ray.is_connected()
        # (Ray Client pickles in band: buffers would reach the server as bytes, which its ray.put keeps in band,
        # so every actor would get a private copy; numpy arrays it keeps out of band, in shared memory)
        ref = ray.put({k: np.frombuffer(b.raw(), np.uint8) for k, b in buffers.items()} if client else _Buffers(buffers))
        specs = {k: spec_of(t) for k, t in weights.items()}
        # read once here, so that actors need not read every array's address (tensors_in_arrays);
        # not through Ray Client, where ray.get would download the whole object
        offsets = None if client else array_offsets(
            {k: a for k, a in _unglue(ray.get(ref), small, specs).items() if a.nbytes})
        return ObjectStorePayload(ref, specs, offsets, small or None)

    def get(self, payload: ObjectStorePayload, device: torch.device) -> dict[str, torch.Tensor]:
        arrays = _unglue(ray.get(payload.ref), payload.small, payload.specs)
        if device.type == "cpu":
            return tensors_in_arrays(arrays, payload.specs, offsets=payload.offsets)
        return arrays_to_device(arrays, payload.specs, device, offsets=payload.offsets, wait=False)  # (one copy)


@hookimpl
def register_backends(register):
    register(ObjectStoreBackend)
