"""Preparing costs the driver no copy of the weights: anonymous memory (``/proc/self/smaps_rollup``)
grows by less than 10% of a ~335 MB model during ``prepare_model_for_actors``, on every backend,
from a built model and from a checkpoint file. The sampler is checked against the old way
(assembling the packed buffer in the driver), which it must see as a whole model."""

from __future__ import annotations

import gc
import threading

import pytest
import ray
import torch
from safetensors.torch import save_file

from ray_zerocopy import prepare_model_for_actors
from ray_zerocopy.backends import packed

BUILT_INS = ("object_store", "packed", "safetensors")


def _anon() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line in smaps_rollup")


class AnonPeak:
    """Peak growth of this process's anonymous memory inside the ``with`` block (sampled every ms)."""

    def __enter__(self) -> AnonPeak:
        gc.collect()
        self.base = self.peak = _anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(5)]).eval()  # 335 MB fp32


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("route", ["built", "checkpoint"])
@pytest.mark.parametrize("name", BUILT_INS)
def test_prepare_adds_no_copy_in_the_driver(ray_local, big, name, route):
    model, path = big
    nbytes = sum(p.nbytes for p in model.parameters())
    if route == "checkpoint":
        with torch.device("meta"):
            model = _model()
    x = torch.randn(2, 4096)
    with AnonPeak() as peak:
        ref = prepare_model_for_actors(model, backend=name, checkpoint=path if route == "checkpoint" else None,
                                       progress=False)
    print(f"\n[{name}, {route}] driver anonymous memory +{peak.growth / 2**20:.1f} MiB for a "
          f"{nbytes / 2**20:.0f} MiB model")
    assert peak.growth < 0.10 * nbytes
    from ray_zerocopy import load_model_in_actor

    with torch.no_grad():
        assert torch.equal(load_model_in_actor(ref)(x), big[0](x))
    del ref


def test_the_sampler_sees_a_driver_copy(ray_local, big):
    weights = dict(big[0].state_dict())
    nbytes = sum(t.nbytes for t in weights.values())
    with AnonPeak() as peak:
        index, size = packed.layout(weights)
        ref = ray.put(packed.pack(weights, index, size))  # what packed.put did before
    del ref
    assert peak.growth > 0.9 * nbytes
