"""Issue 28: through Ray Client (ray://), an actor created with a ModelRef argument loads it (it used to hang: the
client's pickler made the ModelRef start its keeper actor from inside the pickling). Ray's own in-process client
server (ray_client_helpers, port 50051), on a fresh local Ray of its own."""

from __future__ import annotations

import pytest
import ray
import torch
from conftest import RAY_INIT, start_local_ray

from ray_zerocopy.actor import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.testing import zoo_input, zoo_model


@pytest.mark.slow  # (a Ray of its own, and a client server)
def test_actor_with_a_model_ref_through_ray_client():
    from ray._private.client_mode_hook import disable_client_hook
    from ray.util.client.ray_client_helpers import ray_start_client_server

    def connect(job_config=None, **_):
        with disable_client_hook():
            return ray.init(**{**RAY_INIT, "num_cpus": 2}, job_config=job_config)

    ray.shutdown()
    try:
        with ray_start_client_server(ray_connect_handler=connect) as client:
            model = zoo_model("hard_cases")
            ref = prepare_model_for_actors(model)

            @client.remote
            class Infer:
                def __init__(self, ref):
                    self.model = load_model_in_actor(ref)

                def __call__(self, x):
                    with torch.no_grad():
                        return self.model(x)

            got = client.get(Infer.remote(ref).__call__.remote(zoo_input()), timeout=120)
            with torch.no_grad():
                assert torch.equal(got, model(zoo_input()))
    finally:
        ray.shutdown()
        start_local_ray()
