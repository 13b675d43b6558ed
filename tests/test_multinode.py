"""Several raylets on this machine (ray.cluster_utils.Cluster), each with its own object store:
actors on every node load the model; each node holds exactly one copy of the weights however
many actors load there, and every actor's output is right. Ray's object transfer does the moving."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import ray
import torch
from conftest import start_local_ray
from ray.cluster_utils import Cluster
from torch import nn

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.plugins import get_backend
from ray_zerocopy.testing import tensors_outside_shared_memory

pytestmark = [pytest.mark.multinode, pytest.mark.slow]  # (clusters of several raylets: the slow tier)

NODES = ("node_a", "node_b")
ACTORS_PER_NODE = (1, 3)  # one copy per node whether one actor or three load there
MB = 1024**2


@pytest.fixture(scope="module")
def cluster():
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=100 * MB,
                                                           include_dashboard=False))
    for name in NODES:
        c.add_node(num_cpus=4, object_store_memory=150 * MB, resources={name: 10})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        start_local_ray()


@ray.remote(num_cpus=1)
class Loader:
    def __init__(self, ref, marker: str) -> None:
        self.model = load_model_in_actor(ref)
        self.marker = marker

    def run(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            out, reference = self.model(x), copy.deepcopy(self.model)(x)  # the deepcopy is private memory
        first = next(self.model.parameters())
        return {"node": ray.get_runtime_context().get_node_id(), "out": out, "reference": reference,
                "outside": tensors_outside_shared_memory(self.model, self.marker), "where": _shm_location(first.data_ptr())}


def _shm_location(ptr: int) -> tuple[str, int]:
    """(plasma file, offset in it) of an address: equal in two processes means the very same bytes."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if len(parts) == 6 and lo <= ptr < hi:
                return parts[5].strip(), ptr - lo + int(parts[2], 16)
    return "", -1


def _object_refs(obj: object) -> list[ray.ObjectRef]:
    """Every ObjectRef inside a backend payload (dataclasses, dicts, lists, tuples)."""
    if isinstance(obj, ray.ObjectRef):
        return [obj]
    if dataclasses.is_dataclass(obj):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [r for item in obj for r in _object_refs(item)]
    return []


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(1024, 1024), nn.GELU()) for _ in range(4))).eval()  # 16.8 MB


@pytest.mark.other_backends_slow  # Ray moves each backend's objects between nodes
def test_one_copy_per_node_and_correct_outputs(cluster, backend):
    model = _model()
    ref = prepare_model_for_actors(model, backend=backend)
    marker = get_backend(backend).shared_memory_marker  # a file-mapping backend keeps one file per node instead
    node_ids = {}
    actors = []
    for name, count in zip(NODES, ACTORS_PER_NODE):
        actors += [Loader.options(resources={name: 1}).remote(ref, marker) for _ in range(count)]
    x = torch.randn(4, 1024)
    results = ray.get([a.run.remote(x) for a in actors])
    for r in results:
        assert torch.equal(r["out"], r["reference"])
        torch.testing.assert_close(r["out"], model(x).detach())
        if backend != "fake_per_tensor":  # that one inlines small tensors (zero_copy=False)
            assert r["outside"] == [], r["where"]
    for name in NODES:
        on_node = results[sum(ACTORS_PER_NODE[: NODES.index(name)]): sum(ACTORS_PER_NODE[: NODES.index(name) + 1])]
        node_ids[name] = {r["node"] for r in on_node}
        assert len(node_ids[name]) == 1 and len({r["where"] for r in on_node}) == 1  # same bytes in every actor
    per_node = _bytes_per_node(ref)
    print(f"\n[{backend}] weights {ref.nbytes} B; object-store bytes of the weight objects per node: "
          + ", ".join(f"{n}={per_node.get(next(iter(node_ids[n])), 0)}" for n in NODES))
    for name in NODES if marker == "plasma" else ():
        held = per_node[next(iter(node_ids[name]))]
        assert ref.nbytes <= held < ref.nbytes + 1 * MB  # one copy (plus the payload's own small metadata)
    del actors


def _bytes_per_node(ref) -> dict[str, int]:
    """Object-store bytes of the model's objects on each node, from Ray's own location table."""
    refs = _object_refs(ref.payload)
    per_node: dict[str, int] = {}
    for info in ray.experimental.get_object_locations(refs).values():
        for node in info["node_ids"]:
            per_node[node] = per_node.get(node, 0) + info["object_size"]
    return per_node
