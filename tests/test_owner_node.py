"""``node=``: weights prepared from a checkpoint on a worker node whose object store holds them, when the
head node's store (where the driver runs) is too small for the model. An owner actor there owns them;
the ModelRef keeps it alive, the last ref's end ends it, its death makes loads raise WeightsLostError."""

from __future__ import annotations

import gc
import time

import pytest
import ray
import torch
from conftest import start_local_ray
from ray.cluster_utils import Cluster
from safetensors.torch import save_file
from test_multinode import _bytes_per_node

from ray_zerocopy import PrepareNodeError, WeightsLostError, load_model_in_actor, prepare_model_for_actors

pytestmark = [pytest.mark.multinode, pytest.mark.slow]  # (clusters of several raylets: the slow tier)
MB = 1024**2
HEAD_STORE = 100 * MB  # smaller than the model


@pytest.fixture(scope="module")
def cluster():
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=HEAD_STORE,
                                                           include_dashboard=False))
    worker = c.add_node(num_cpus=2, object_store_memory=500 * MB, resources={"big": 10})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield worker.node_id
    finally:
        ray.shutdown()
        c.shutdown()
        start_local_ray()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(9)]).eval()  # 151 MB fp32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    model = _model()
    save_file(model.state_dict(), path)
    return model, path


def _skeleton() -> torch.nn.Module:
    with torch.device("meta"):
        return _model()


@ray.remote(num_cpus=1, resources={"big": 1})
def _run(ref, x):
    with torch.no_grad():
        return load_model_in_actor(ref)(x)


@pytest.mark.parametrize("name", ["object_store", "packed", "safetensors"])
def test_weights_live_on_the_chosen_node(cluster, checkpoint, name):
    model, path = checkpoint
    nbytes = sum(p.nbytes for p in model.parameters())
    assert nbytes > HEAD_STORE
    ref = prepare_model_for_actors(_skeleton(), backend=name, checkpoint=path, node=cluster)
    x = torch.randn(3, 2048)
    assert torch.equal(ray.get(_run.remote(ref, x)), model(x).detach())
    per_node = _bytes_per_node(ref)
    assert set(per_node) == {cluster} and per_node[cluster] >= nbytes  # nothing in the head node's store
    owner_id = ref.owner._actor_id.hex()
    del ref
    gc.collect()
    assert _wait_dead(owner_id), "the owner outlived the last ModelRef"


def _wait_dead(actor_id: str, timeout: float = 30) -> bool:
    from ray._private import state  # the GCS's actor table (the state API needs the dashboard)

    deadline = time.time() + timeout
    while time.time() < deadline:
        if state.actors(actor_id=actor_id).get("State") == "DEAD":
            return True
        time.sleep(0.5)
    return False


def test_owner_death_gives_weights_lost(cluster, checkpoint):
    ref = prepare_model_for_actors(_skeleton(), checkpoint=checkpoint[1], node=cluster)
    ray.kill(ref.owner)
    assert _wait_dead(ref.owner._actor_id.hex()), "ray.kill did not end the owner"
    # Ray tells the nodes of the owner's death a moment later (loads meanwhile still read intact weights)
    deadline = time.time() + 30
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        while time.time() < deadline:
            ray.get(_run.remote(ref, torch.randn(1, 2048)), timeout=60)
            time.sleep(0.5)
    assert isinstance(info.value.cause, WeightsLostError)


def test_node_errors(cluster, checkpoint):
    with pytest.raises(PrepareNodeError, match="not an alive node") as info:
        prepare_model_for_actors(_skeleton(), checkpoint=checkpoint[1], node="f" * 56)
    assert cluster in str(info.value)
    with pytest.raises(PrepareNodeError, match="needs checkpoint="):
        prepare_model_for_actors(torch.nn.Linear(2, 2), node=cluster)
