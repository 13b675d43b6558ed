"""A 4 GiB bfloat16 model shared by 4 actors on this machine: node memory (object-store bytes plus
what the actors add) stays about one model's size, and every actor computes the same right output."""

from __future__ import annotations

import gc
import hashlib

import psutil
import pytest
import ray
import torch
from conftest import start_local_ray
from torch import nn

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.testing import tensors_outside_shared_memory

pytestmark = pytest.mark.slow

GiB = 1024**3
WIDTH, DEPTH, ACTORS = 8192, 32, 4  # 32 x 8192 x 8192 x 2 bytes = 4 GiB


@pytest.fixture(scope="module")
def big_store():
    ray.shutdown()
    ray.init(address="local", num_cpus=ACTORS, object_store_memory=int(4.5 * GiB), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        start_local_ray()


def _private_and_pss() -> tuple[int, int]:
    """(USS, PSS outside Ray's store) of this process: memory it adds beyond the shared weights."""
    proc = psutil.Process()
    pss = sum(m.pss for m in proc.memory_maps(grouped=True) if "plasma" not in m.path)
    return proc.memory_full_info().uss, pss


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


@ray.remote(num_cpus=1)
class BigLoader:
    def __init__(self, ref) -> None:
        self.before = _private_and_pss()
        self.model = load_model_in_actor(ref)

    def run(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            out = self.model(x)  # reads every weight page
        uss, pss = _private_and_pss()
        store_pss = sum(m.pss for m in psutil.Process().memory_maps(grouped=True) if "plasma" in m.path)
        return {"out": out, "added_uss": uss - self.before[0], "added_pss": pss - self.before[1],
                "store_pss": store_pss, "outside": tensors_outside_shared_memory(self.model),
                "digests": (_digest(self.model[0].weight), _digest(self.model[-1].weight))}


def test_4gib_bf16_model_shared_by_4_actors(big_store, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False, dtype=torch.bfloat16) for _ in range(DEPTH)))
    x = torch.randn(1, WIDTH, dtype=torch.bfloat16)
    expected = model.eval()(x).detach()
    digests = (_digest(model[0].weight.detach()), _digest(model[-1].weight.detach()))
    ref = prepare_model_for_actors(model)
    size = ref.nbytes
    assert size >= 4 * GiB
    del model
    gc.collect()  # the driver's copy goes: the node keeps only the object store's
    actors = [BigLoader.remote(ref) for _ in range(ACTORS)]
    results = ray.get([a.run.remote(x) for a in actors], timeout=600)
    store = sum(i["object_size"] for i in ray.experimental.get_object_locations(list(ref.object_refs)).values())
    assert size <= store < size + 2**20, store  # measured, never assumed: the weights' objects, one copy
    added_pss = sum(r["added_pss"] for r in results)
    added_uss = sum(r["added_uss"] for r in results)
    node = store + added_pss
    with capsys.disabled():
        print(f"\nmodel {size / GiB:.2f} GiB bf16, {ACTORS} actors: object store {store / GiB:.2f} GiB, actors added "
              f"PSS {added_pss / GiB:.3f} GiB (USS {added_uss / GiB:.3f} GiB) outside the store, store pages' PSS "
              f"per actor {[round(r['store_pss'] / GiB, 2) for r in results]} GiB; node memory "
              f"{node / GiB:.2f} GiB = {node / size:.2f} x model size")
    for r in results:
        assert r["outside"] == [] and r["digests"] == digests
        assert torch.equal(r["out"], results[0]["out"])  # same kind of worker: bit-for-bit equal
        torch.testing.assert_close(r["out"], expected, rtol=0.05, atol=1e-3 * expected.abs().max().item())
    assert node < 1.5 * size  # 4 private copies would be 5x
    del actors, results
