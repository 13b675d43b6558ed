"""A test transport that differs from every built-in one: one ``ray.put`` per tensor.

It is installed by the test session as a real distribution with a real entry point
(see tests/conftest.py), so the suite exercises third-party discovery in the driver
and in every Ray worker.
"""

from __future__ import annotations

import ray

from ray_zerocopy import Backend, hookimpl, quiet_readonly, spec_of, tensor_from_bytes, tensor_to_bytes, to_device


class PerTensorBackend(Backend):
    name = "fake_per_tensor"
    zero_copy = False  # Ray inlines objects under 100 KiB in the owner: small tensors arrive as copies

    def put(self, weights):
        return {k: (ray.put(tensor_to_bytes(t)), spec_of(t)) for k, t in weights.items()}

    def get(self, payload, device):
        arrays = ray.get([ref for ref, _ in payload.values()])
        with quiet_readonly():
            tensors = {k: tensor_from_bytes(a, *spec) for (k, (_, spec)), a in zip(payload.items(), arrays)}
        return to_device(tensors, device)


@hookimpl
def register_backends(register):
    register(PerTensorBackend)
