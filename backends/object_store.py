"""The default transport: one object in Ray's object store holding one numpy array per tensor.

Numpy arrays stay out of band in Ray's serializer (64-byte aligned, zero-copy on get),
so an actor's ``ray.get`` returns read-only arrays that point into the node's shared
memory, and each tensor is a view of one of them. Every tensor travels as raw bytes
(a uint8 array) plus its dtype name, so bfloat16 and fp8 work although numpy lacks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import ray
import torch

from ray_zerocopy import (
    Backend,
    hookimpl,
    quiet_readonly,
    spec_of,
    tensor_from_bytes,
    tensor_to_bytes,
    tensors_in_arrays,
    to_device,
)


@dataclass(frozen=True)
class ObjectStorePayload:
    ref: ray.ObjectRef  # -> dict[name, np.ndarray(uint8)]
    specs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype name, shape)


class ObjectStoreBackend(Backend):
    name = "object_store"

    def put(self, weights: Mapping[str, torch.Tensor]) -> ObjectStorePayload:
        arrays = {k: tensor_to_bytes(t) for k, t in weights.items()}
        return ObjectStorePayload(ray.put(arrays), {k: spec_of(t) for k, t in weights.items()})

    def get(self, payload: ObjectStorePayload, device: torch.device) -> dict[str, torch.Tensor]:
        arrays = ray.get(payload.ref)
        if device.type == "cpu":
            return tensors_in_arrays(arrays, payload.specs)
        with quiet_readonly():
            return to_device({k: tensor_from_bytes(arrays[k], *spec) for k, spec in payload.specs.items()}, device)


@hookimpl
def register_backends(register):
    register(ObjectStoreBackend)
