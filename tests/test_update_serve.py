"""Live weight updates where users need them (issue 30): Ray Serve replicas switched by ``user_config`` under
live traffic, and a Ray Data job that picks up newer weights between batches. Slow (Serve and Data start
many processes): ``pytest -m slow tests/test_update_serve.py``.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import ray
import torch

from ray_zerocopy import hold_weights, load_model_in_actor, prepare_model_for_actors, update_model_in_actor
from ray_zerocopy.testing import zoo_input, zoo_model

pytestmark = pytest.mark.slow
VERSIONS = 4


@ray.remote(num_cpus=0)
class Registry:
    """The newest ModelRef by version: what a replica or a Ray Data actor asks for (JSON user_config cannot
    carry a ModelRef, only its version number)."""

    def __init__(self) -> None:
        self.refs: dict[int, object] = {}

    def publish(self, version: int, ref) -> None:
        self.refs = {v: r for v, r in self.refs.items() if v >= version - 1}  # (older ones can be freed)
        self.refs[version] = ref

    def get(self, version: int):
        return self.refs[version]

    def latest(self) -> int:
        return max(self.refs)


def _versions() -> tuple[list[torch.nn.Module], torch.Tensor, list[torch.Tensor]]:
    models = [zoo_model("hard_cases", seed=v) for v in range(VERSIONS)]
    x = zoo_input()
    with torch.no_grad():
        return models, x, [m(x) for m in models]


def _which(out: torch.Tensor, expected: list[torch.Tensor]) -> int | None:
    return next((v for v, e in enumerate(expected) if torch.equal(out, e)), None)


REGISTRY = ("rzc-update-registry", "rzc-test")  # (name, namespace): replicas run in Serve's namespace


def _serve_model():
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
    class Model:
        def __init__(self) -> None:
            self.registry, self.model = ray.get_actor(*REGISTRY), None

        def reconfigure(self, config: dict) -> None:  # every replica, also one that starts mid-update
            ref = ray.get(self.registry.get.remote(config["version"]))
            if self.model is None:
                self.model = load_model_in_actor(ref)
            else:
                update_model_in_actor(self.model, ref)

        def __call__(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
            with hold_weights(self.model), torch.no_grad():  # (Serve runs sync methods in a thread pool)
                return os.getpid(), self.model(x)

    return Model


def build_app(args: dict):
    """The ``import_path`` of the config deploy below."""
    return _serve_model().bind()


def _deploy(version: int) -> None:
    """``serve deploy`` of a config whose only change is ``user_config``: Serve reconfigures the running
    replicas (a Python ``serve.run`` would start new ones: it gives every run a new code version)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = {"applications": [{
        "name": "rzc-update", "route_prefix": None, "import_path": "test_update_serve:build_app",
        "runtime_env": {"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}},
        "deployments": [{"name": "Model", "user_config": {"version": version}}]}]}
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def test_serve_replicas_switch_versions_under_live_traffic_without_restarts(ray_local):
    from ray import serve

    models, x, expected = _versions()
    registry = Registry.options(name=REGISTRY[0], namespace=REGISTRY[1]).remote()
    refs = [prepare_model_for_actors(models[0])]
    ray.get(registry.publish.remote(0, refs[0]))
    serve.start()
    _deploy(0)
    deadline = time.monotonic() + 180
    while (app := serve.status().applications.get("rzc-update")) is None or app.status != "RUNNING":
        assert time.monotonic() < deadline and (app is None or app.status != "DEPLOY_FAILED"), app
        time.sleep(1)
    handle = serve.get_app_handle("rzc-update")
    answers: list = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answers.append(handle.remote(x).result(timeout_s=60))
            except Exception as exc:  # a failed request fails the test below
                answers.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        pids_before = {a[0] for a in answers if not isinstance(a, Exception)}
        for version in range(1, VERSIONS):
            refs.append(prepare_model_for_actors(models[version], like=refs[-1]))  # (only the weights are put)
            ray.get(registry.publish.remote(version, refs[-1]))
            _deploy(version)
            time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        served = [handle.remote(x).result() for _ in range(20)]
    finally:
        stop.set()
        serve.delete("rzc-update")
        ray.kill(registry)
    failed = [a for a in answers if isinstance(a, Exception)]
    assert not failed, failed[:3]
    seen = [_which(out, expected) for _, out in answers]
    assert None not in seen, "an answer matches no version: weights of two versions were mixed in one call"
    assert set(seen) == set(range(VERSIONS)), set(seen)  # every version served during the run
    assert [_which(out, expected) for _, out in served] == [VERSIONS - 1] * 20
    assert {pid for pid, _ in served} == pids_before and len(pids_before) == 2  # the same replicas: no restart


def test_ray_data_job_picks_up_newer_weights_between_batches(ray_local):
    models, x, expected = _versions()
    registry = Registry.options(name="rzc-data-registry").remote()
    ray.get(registry.publish.remote(0, prepare_model_for_actors(models[0])))

    class Predictor:
        def __init__(self, registry) -> None:
            self.registry = registry
            self.version = ray.get(registry.latest.remote())
            self.model = load_model_in_actor(ray.get(registry.get.remote(self.version)))

        def __call__(self, batch: dict) -> dict:
            latest = ray.get(self.registry.latest.remote())  # (one small actor call per batch)
            if latest != self.version:
                update_model_in_actor(self.model, ray.get(self.registry.get.remote(latest)))
                self.version = latest
            time.sleep(0.05)
            with torch.no_grad():
                out = self.model(x).numpy()
            return {"id": batch["id"], "version": np.full(len(batch["id"]), self.version),
                    "out": np.repeat(out[None], len(batch["id"]), axis=0)}

    ds = ray.data.range(60).map_batches(Predictor, fn_constructor_kwargs={"registry": registry}, batch_size=1,
                                         concurrency=1, num_cpus=0)
    rows = []
    for i, batch in enumerate(ds.iter_batches(batch_size=1)):
        rows.append(batch)
        if i == 5:
            ray.get(registry.publish.remote(1, prepare_model_for_actors(models[1])))
    versions = [int(b["version"][0]) for b in rows]
    assert versions[0] == 0 and versions[-1] == 1, versions
    assert versions == sorted(versions)  # one actor: it never goes back
    assert all(torch.equal(torch.as_tensor(b["out"][0]), expected[v]) for b, v in zip(rows, versions))
