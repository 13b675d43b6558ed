"""Ray Serve: replicas of one deployment share one copy of the weights per node.

Real Serve, real HTTP through Serve's proxy (on a free port), real replica processes. The
ModelRef goes through ``.bind(...)``; Serve pickles it outside Ray, so it travels as a keeper
token (see ray_zerocopy/keeper.py) and the weights leave the object store with the deployment.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import ray
import requests
import torch
from ray import serve
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors

pytestmark = pytest.mark.slow
LAYERS, WIDTH = 16, 1024  # 16 x 4 MiB: a 64 MiB model


def private_bytes(pid: int | str = "self") -> int:
    """Private_Clean + Private_Dirty of a process (its USS), from /proc/<pid>/smaps_rollup."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def store_used() -> int:
    """Bytes in the node's object store (plasma), as the raylet reports them."""
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.object_store_bytes_used


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [m for _ in range(LAYERS) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())]
    return torch.nn.Sequential(*layers).eval()


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0})
class Model:
    def __init__(self, model_ref, private_copy: bool = False, device: str = "cpu", share_gpu: bool = False):
        torch.ones(8, 8) @ torch.ones(8, 8)  # warm torch's allocator: not the model's memory
        self.baseline = private_bytes()
        start = time.perf_counter()
        self.model = load_model_in_actor(model_ref, device=device, private_copy=private_copy, share_gpu=share_gpu)
        self.load_ms = (time.perf_counter() - start) * 1e3
        with torch.no_grad():  # read every weight, as inference does
            sum(float(p.sum()) for p in self.model.parameters())
        self.added = private_bytes() - self.baseline
        self.device = device

    def predict(self, rows: list) -> list:
        with torch.no_grad():
            return self.model(torch.tensor(rows, device=self.device)).cpu().tolist()

    def info(self) -> dict:
        return {"pid": os.getpid(), "baseline": self.baseline, "added": self.added, "load_ms": self.load_ms}

    async def __call__(self, request) -> dict:
        return {"y": self.predict((await request.json())["x"]), "pid": os.getpid()}


@pytest.fixture
def serve_port(ray_local):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def replica_infos(handle, count: int, timeout_s: float = 60) -> dict[int, dict]:
    """``info()`` of ``count`` distinct live replicas (asked through the handle until each has answered)."""
    infos: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(infos) < count:
        assert time.monotonic() < deadline, f"only {len(infos)} of {count} replicas answered"
        for info in [r.result() for r in [handle.info.remote() for _ in range(4 * count)]]:
            infos[info["pid"]] = info
    return infos


def post(port: int, route: str, rows: list) -> dict:
    reply = requests.post(f"http://127.0.0.1:{port}{route}", json={"x": rows}, timeout=30)
    reply.raise_for_status()
    return reply.json()


def expected(model: torch.nn.Module, rows: list) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(rows))


def test_four_replicas_share_one_copy(serve_port):
    model = mlp()
    size = sum(p.nbytes for p in model.parameters())
    rows = torch.randn(3, WIDTH).tolist()
    ref = prepare_model_for_actors(model)
    shared = serve.run(Model.bind(ref), name="shared", route_prefix="/shared")
    private = serve.run(Model.bind(ref, private_copy=True), name="private", route_prefix="/private")
    for route, handle in (("/shared", shared), ("/private", private)):
        for _ in range(8):  # HTTP through the proxy, spread over the replicas
            assert torch.allclose(torch.tensor(post(serve_port, route, rows)["y"]), expected(model, rows), atol=1e-5)
        assert torch.allclose(torch.tensor(handle.predict.remote(rows).result()), expected(model, rows), atol=1e-5)
    for name, handle, low, high in (("shared", shared, 0, 0.1), ("private", private, 0.9, 1.5)):
        infos = replica_infos(handle, 4)
        assert len(infos) == 4
        for pid, info in infos.items():
            now = private_bytes(pid) - info["baseline"]  # read here, after the traffic
            for added in (info["added"], now):
                assert low * size <= added < high * size, (
                    f"{name} replica {pid} added {added / 2**20:.1f} MiB private for a {size / 2**20:.0f} MiB model")
        print(f"{name}: load ms {[round(i['load_ms'], 1) for i in infos.values()]}, added MiB "
              f"{[round(i['added'] / 2**20, 1) for i in infos.values()]} (model {size / 2**20:.0f} MiB)")


def test_killed_replica_comes_back_after_the_driver_dropped_its_ref(serve_port):
    """Scripts drop their ModelRef after serve.run: restarts and scaling must still find the weights."""
    model = mlp()
    rows = torch.randn(2, WIDTH).tolist()
    handle = serve.run(Model.options(num_replicas=2).bind(prepare_model_for_actors(model)), name="kill",
                       route_prefix="/kill")
    before = replica_infos(handle, 2)
    stop, errors, ok = threading.Event(), [], []

    def traffic() -> None:
        while not stop.is_set():
            try:
                ok.append(torch.allclose(torch.tensor(post(serve_port, "/kill", rows)["y"]), expected(model, rows),
                                         atol=1e-5))
            except requests.RequestException as exc:  # the request the dying replica held
                errors.append(exc)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while len(ok) < 3:  # (traffic is flowing before the kill)
            assert time.monotonic() < deadline and not errors, f"{len(ok)} answers, errors: {errors[:3]}"
            time.sleep(0.05)
        victim = next(iter(before))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:
            after = replica_infos(handle, 2)
            if victim not in after and len(after) == 2:
                break
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(1)
    finally:
        stop.set()
        sender.join()
    assert all(ok) and len(ok) > len(errors), f"{len(ok)} answers, {len(errors)} failed requests"
    newcomer = (set(after) - set(before)).pop()
    assert after[newcomer]["added"] < 0.1 * sum(p.nbytes for p in model.parameters())
    for _ in range(6):
        assert torch.allclose(torch.tensor(post(serve_port, "/kill", rows)["y"]), expected(model, rows), atol=1e-5)


def wait_for_store(target: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while (used := store_used()) > target and time.monotonic() < deadline:
        time.sleep(0.5)
    return used


def test_weights_leave_the_store_after_redeploy_and_shutdown(serve_port):
    v1, v2 = mlp(1), mlp(2)
    size = sum(p.nbytes for p in v1.parameters())
    # the previous test's model leaves the store a few seconds after its serve.shutdown() (its keeper's
    # grace period): a base read before that would drop by a model under this test's feet
    base = wait_for_store(size // 2, timeout_s=60)
    rows = torch.randn(2, WIDTH).tolist()
    ref1 = prepare_model_for_actors(v1)
    handle = serve.run(Model.options(num_replicas=2).bind(ref1), name="v", route_prefix="/v")
    assert torch.allclose(torch.tensor(post(serve_port, "/v", rows)["y"]), expected(v1, rows), atol=1e-5)
    ref2 = prepare_model_for_actors(v2)
    assert store_used() >= base + 2 * size
    handle = serve.run(Model.options(num_replicas=2).bind(ref2), name="v", route_prefix="/v")  # a new version
    del ref1  # the driver lets v1 go; its replicas are being replaced
    # (v1's keeper waits REPLICA_START_S for v2's replicas to load v1, as restarted v1 replicas would)
    assert wait_for_store(base + 1.1 * size, timeout_s=120) <= base + 1.1 * size, "v1's weights stayed after the redeploy"
    assert torch.allclose(torch.tensor(post(serve_port, "/v", rows)["y"]), expected(v2, rows), atol=1e-5)
    handle = serve.run(Model.options(num_replicas=3).bind(ref2), name="v", route_prefix="/v")  # scale up
    assert len(replica_infos(handle, 3)) == 3
    handle = serve.run(Model.options(num_replicas=1).bind(ref2), name="v", route_prefix="/v")  # and down
    assert torch.allclose(torch.tensor(handle.predict.remote(rows).result()), expected(v2, rows), atol=1e-5)
    del ref2, handle
    assert store_used() >= base + size, "v2's weights must stay while its replica runs"
    serve.shutdown()
    assert wait_for_store(base) <= base, f"{(store_used() - base) / 2**20:.0f} MiB left after serve.shutdown()"


def build_config_app(args: dict):
    """The ``import_path`` of the config deploy below: Serve's build task imports and calls it."""
    return Model.options(num_replicas=2).bind(prepare_model_for_actors(mlp(args["seed"])))


def test_config_deploy_keeps_the_weights_while_its_app_exists(serve_port):
    """A config deploy (``serve deploy config.yaml``: the dashboard hands the config to Serve's controller,
    as ``deploy_apps`` does here) prepares the model in Serve's build task, whose process drops its
    ModelRef when the build returns. All replicas die at once: Serve's new ones load the weights. Deleting
    the app frees them."""
    from ray.serve.schema import ServeDeploySchema

    model = mlp(3)
    size = sum(p.nbytes for p in model.parameters())
    base = wait_for_store(size // 2, timeout_s=60)  # (an earlier test's model may still be leaving)
    rows = torch.randn(2, WIDTH).tolist()
    config = {"applications": [{"name": "cfg", "route_prefix": "/cfg", "import_path": "test_serve:build_config_app",
                                "args": {"seed": 3}, "runtime_env": {"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}}}]}
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 120
    while (app := serve.status().applications.get("cfg")) is None or app.status != "RUNNING":
        assert time.monotonic() < deadline and (app is None or app.status != "DEPLOY_FAILED"), app
        time.sleep(1)
    handle = serve.get_app_handle("cfg")
    before = replica_infos(handle, 2)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, "the killed replicas were not replaced"
        try:
            if before.keys().isdisjoint(after := replica_infos(handle, 2, timeout_s=10)):
                break
        except AssertionError:  # (not both up yet)
            pass
    assert all(info["added"] < 0.1 * size for info in after.values())  # (the shared weights, not a copy)
    assert torch.allclose(torch.tensor(post(serve_port, "/cfg", rows)["y"]), expected(model, rows), atol=1e-5)
    assert store_used() >= base + size
    serve.delete("cfg")
    assert wait_for_store(base) <= base, f"{(store_used() - base) / 2**20:.0f} MiB left after serve.delete()"


# ---------------------------------------------------------------- GPU replicas (skip without CUDA)

@pytest.mark.gpu
@pytest.mark.parametrize("share_gpu", [False, True])
def test_gpu_replicas(serve_port, share_gpu):
    """One replica per GPU (num_gpus=1), or 4 replicas on one GPU mapping one device copy (share_gpu)."""
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.fail(f"torch sees {torch.cuda.device_count()} CUDA device(s) but Ray reports no GPU")
    model = mlp()
    rows = torch.randn(3, WIDTH).tolist()
    replicas, gpus = (4, 0.25) if share_gpu else (1, 1)
    app = Model.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0, "num_gpus": gpus})
    handle = serve.run(app.bind(prepare_model_for_actors(model), device="cuda", share_gpu=share_gpu), name="gpu",
                       route_prefix="/gpu")
    assert len(replica_infos(handle, replicas)) == replicas
    for _ in range(2 * replicas):
        assert torch.allclose(torch.tensor(post(serve_port, "/gpu", rows)["y"]), expected(model, rows), atol=1e-4)
