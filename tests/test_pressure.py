"""Object store pressure, in a Ray of its own with a 150 MB store (spilling on): a model larger
than the free space makes Ray spill and loads correctly; one larger than the whole store is held by
Ray's fallback allocation (a disk-backed mapping) and loads correctly; every wait is bounded, so
nothing hangs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import ray
import torch
from conftest import start_local_ray
from torch import nn

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors

pytestmark = pytest.mark.slow

MB = 1024**2
STORE = 150 * MB
TIMEOUT = 180  # seconds: a hang fails the test instead of the CI job


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    ray.shutdown()
    spill = tmp_path_factory.mktemp("spill")
    ray.init(address="local", num_cpus=2, object_store_memory=STORE, include_dashboard=False, log_to_driver=False,
             _system_config={"object_spilling_config": f'{{"type": "filesystem", "params": {{"directory_path": "{spill}"}}}}'})
    try:
        yield spill
    finally:
        ray.shutdown()
        start_local_ray()


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth))).eval()


def _digests(model: nn.Module) -> dict[str, str]:
    return {k: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy()).hexdigest()
            for k, t in model.state_dict().items()}


@ray.remote(num_cpus=1)
def _load_and_run(ref, x: torch.Tensor) -> tuple[dict[str, str], torch.Tensor]:
    model = load_model_in_actor(ref)
    with torch.no_grad():
        return _digests(model), model(x)


def _check_loads(model: nn.Module, ref) -> None:
    x = torch.randn(2, model[0].in_features)
    digests, out = ray.get(_load_and_run.remote(ref, x), timeout=TIMEOUT)
    assert digests == _digests(model)  # every weight byte-identical after the round trip
    torch.testing.assert_close(out, model(x).detach())


def test_model_larger_than_free_store_spills_and_loads(small_store):
    filler = ray.put(np.ones(100 * MB, np.uint8))  # pinned by the driver: 50 MB stay free
    model = _model(2048, 5)  # 84 MB
    assert sum(p.nbytes for p in model.parameters()) > STORE - 100 * MB
    ref = prepare_model_for_actors(model)
    _check_loads(model, ref)
    spilled = sum(p.stat().st_size for p in small_store.rglob("*") if p.is_file())
    print(f"\nspilled after the load: {spilled / MB:.0f} MB")
    assert spilled >= 50 * MB, f"only {spilled / MB:.0f} MB spilled: the store was never under pressure"
    assert ray.get(filler, timeout=TIMEOUT).sum() == 100 * MB  # the spilled filler comes back intact


def _mapped_file(ptr: int) -> str:
    """The file behind the mapping of this process that holds address ``ptr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 else ""
    return ""


@ray.remote(num_cpus=1)
def _files_of(ref, small) -> tuple[str, str]:
    """(file behind the loaded weights, file behind a small object: the store's own file)."""
    model = load_model_in_actor(ref)
    return _mapped_file(model[0].weight.data_ptr()), _mapped_file(ray.get(small[0]).ctypes.data)


def test_model_larger_than_whole_store_loads_through_the_fallback_allocation(small_store):
    model = _model(4096, 3)  # 201 MB > the 150 MB store
    nbytes = sum(p.nbytes for p in model.parameters())
    assert nbytes > STORE
    ref = prepare_model_for_actors(model)  # no ObjectStoreFullError: Ray allocates it outside the store
    assert ref.nbytes == nbytes
    _check_loads(model, ref)
    weights_file, store_file = ray.get(_files_of.remote(ref, [ray.put(np.ones(1024, np.uint8))]), timeout=TIMEOUT)
    # still zero copy, from a file of Ray's fallback allocation (the store's own file is another)
    assert "plasma" in weights_file and "plasma" in store_file and weights_file != store_file, (weights_file, store_file)
