"""Through Ray Client (``ray.init("ray://...")``, how notebooks reach a remote cluster), on a real cluster that
``ray start --head`` starts with its client server: an actor created with a ModelRef argument loads it on every
backend, zero-copy and bit-identical, and a Ray Data actor pool shares it. (An actor with a ModelRef argument
used to hang there: the client's pickler made the ModelRef start its keeper actor from inside the pickling;
and the ``object_store`` backend's buffers reached the server as bytes, which actors could not load.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import ray
import torch
from conftest import start_local_ray

from ray_zerocopy.actor import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.plugins import get_backend
from ray_zerocopy.testing import tensors_outside_shared_memory, zoo_input, zoo_model

BUILT_IN = ["object_store", "packed", "safetensors"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client_address():
    """A head node of its own (its own temp dir, so the suite's local Ray is untouched) with a client server;
    yields its ray:// address, then stops it (``ray start --block`` stops what it started when terminated)."""
    ray.shutdown()
    port, client_port = _free_port(), _free_port()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="rzc-client-") as tmp:
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client_port}",
             f"--runtime-env-agent-port={_free_port()}", "--num-cpus=4", "--object-store-memory=400000000",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ["RAY_AUTH_MODE"] = "disabled"  # (the client must not ask for a token the head does not want)
        try:
            deadline = time.monotonic() + 90
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", client_port)) == 0:
                        break
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not open its client port (exit {head.poll()})")
                time.sleep(0.5)
            yield f"ray://127.0.0.1:{client_port}"
        finally:
            ray.shutdown()
            os.environ.pop("RAY_AUTH_MODE", None)
            head.terminate()
            head.wait(timeout=60)
            start_local_ray()


@ray.remote(num_cpus=0.5)
class _Infer:
    def __init__(self, ref, marker):
        self.model = load_model_in_actor(ref)
        self.outside = tensors_outside_shared_memory(self.model, marker)

    def __call__(self, x):
        with torch.no_grad():
            return self.model(x), self.outside


class _Predict:
    def __init__(self, ref):
        self.model = load_model_in_actor(ref)

    def __call__(self, batch):
        with torch.no_grad():
            return {"i": batch["i"], "y": self.model(torch.as_tensor(batch["x"])).numpy()}


@ray.remote(num_cpus=0.25)
def _ray_data_job(ref, x):
    """Ray Data runs in the cluster (its executor needs a worker there, not a client): the usual Ray Client
    pattern is a task that runs the job."""
    import ray.data

    ds = ray.data.from_items([{"i": i, "x": row.numpy()} for i, row in enumerate(x)])
    return ds.map_batches(_Predict, fn_constructor_args=(ref,), batch_size=2, concurrency=2, num_cpus=0.5).take_all()


@pytest.mark.slow  # (a head node of its own)
def test_models_through_ray_client(client_address):
    ray.init(client_address)
    model, x = zoo_model("hard_cases"), zoo_input()
    with torch.no_grad():
        expected = model(x)
    for backend in BUILT_IN:
        ref = prepare_model_for_actors(model, backend=backend)
        got, outside = ray.get(_Infer.remote(ref, get_backend(backend).shared_memory_marker).__call__.remote(x),
                               timeout=120)
        assert torch.equal(got, expected), backend
        assert outside == [], f"{backend}: private copies of {outside}"
    rows = ray.get(_ray_data_job.remote(prepare_model_for_actors(model), x), timeout=300)
    rows.sort(key=lambda r: r["i"])  # (batches of another size: close, not necessarily bit-identical)
    torch.testing.assert_close(torch.stack([torch.as_tensor(r["y"]) for r in rows]), expected)
