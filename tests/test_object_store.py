"""The object_store transport: one numpy array per tensor in one object, and the offsets that spare
an actor reading every array's address."""

from __future__ import annotations

import dataclasses

import ray
import torch

from ray_zerocopy import array_offsets
from ray_zerocopy._tensors import split_model
from ray_zerocopy.backends import object_store
from ray_zerocopy.testing import shared_mappings, zoo_model


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@ray.remote
def _load_report(payload):
    from ray_zerocopy.plugins import get_backend

    tensors = get_backend("object_store").get(payload, torch.device("cpu"))
    maps = shared_mappings("plasma", writable=True)
    return {
        "bits": {k: (t.dtype, tuple(t.shape), bits(t)) for k, t in tensors.items()},
        "offsets_here": array_offsets({k: a for k, a in object_store._unglue(ray.get(payload.ref), payload.small,
                                                                              payload.specs).items() if a.nbytes}),
        "in_rays_mapping": [k for k, t in tensors.items() if t.nbytes and any(lo <= t.data_ptr() < hi for lo, hi, _ in maps)],
    }


def test_offsets_read_in_the_driver_hold_in_a_worker(ray_local):
    weights = split_model(zoo_model("hard_cases")).weights  # every dtype, empty and odd-sized tensors
    payload = object_store.ObjectStoreBackend().put(weights)
    got = ray.get(_load_report.remote(payload))
    assert got["offsets_here"] == payload.offsets
    assert got["bits"] == {k: (t.dtype, tuple(t.shape), bits(t)) for k, t in weights.items()}
    assert got["in_rays_mapping"] == []  # every view goes through a copy-on-write mapping, none through Ray's


def test_offsets_that_do_not_match_the_object_are_not_trusted(ray_local):
    """Offsets of another layout (here: all but the first moved) fail the first/last check: every
    address is read instead."""
    weights = split_model(zoo_model("hard_cases")).weights
    payload = object_store.ObjectStoreBackend().put(weights)
    moved = {k: v + 64 * bool(i) for i, (k, v) in enumerate(payload.offsets.items())}
    shifted = dataclasses.replace(payload, offsets=moved)
    got = ray.get(_load_report.remote(shifted))
    assert got["bits"] == {k: (t.dtype, tuple(t.shape), bits(t)) for k, t in weights.items()}
    dropped = dataclasses.replace(payload, offsets=None)  # a payload written before offsets existed
    assert ray.get(_load_report.remote(dropped))["bits"] == got["bits"]
