"""Four actors holding one model add far less than four model sizes of private memory (default backend;
the conformance kit checks per backend that a backend claiming zero copy returns views of shared memory)."""

from __future__ import annotations

import psutil
import pytest
import ray
import torch

from ray_zerocopy.actor import load_model_in_actor, prepare_model_for_actors

ACTORS = 4


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(6)]).eval()  # ~100 MB


@ray.remote(num_cpus=1)
class MemoryProbe:
    def __init__(self):
        torch.ones(1) @ torch.ones(1)  # warm torch's allocator so it is not counted as the model
        self.model = None

    def load(self, how, ref):
        before = psutil.Process().memory_full_info().uss
        self.model = load_model_in_actor(ref) if how == "zerocopy" else ray.get(ref[0])
        with torch.no_grad():  # touch every weight page, as inference would
            checksum = sum(float(p.double().sum()) for p in self.model.parameters())
        return psutil.Process().memory_full_info().uss - before, checksum


def _private_bytes(how: str, ref) -> list[int]:
    probes = [MemoryProbe.remote() for _ in range(ACTORS)]
    try:
        results = ray.get([p.load.remote(how, ref) for p in probes])  # all four hold the model at once
    finally:
        for p in probes:
            ray.kill(p)
    assert len({round(c, 3) for _, c in results}) == 1, "actors saw different weights"
    return [uss for uss, _ in results]


def test_four_actors_share_one_copy(ray_local):
    model = _mlp()
    size = sum(p.nbytes for p in model.parameters())
    added = _private_bytes("zerocopy", prepare_model_for_actors(model))
    assert sum(added) < 0.25 * size, f"4 actors added {sum(added) / 2**20:.0f} MiB private for a {size / 2**20:.0f} MiB model"


@pytest.mark.slow  # (the baseline: four private copies)
def test_plain_ray_get_copies_per_actor(ray_local):
    """The control: the same probe sees each actor's private copy when weights are deserialized normally."""
    model = _mlp()
    size = sum(p.nbytes for p in model.parameters())
    added = _private_bytes("plain", [ray.put(model)])  # nested: deserialized inside load()
    assert min(added) > 0.9 * size
