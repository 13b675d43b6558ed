"""Actors killed mid-run come back, reload the model and finish every row; weights that are gone
give an error that says what happened and what to do."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pytest
import ray
import torch

from ray_zerocopy import WeightsLostError, load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.testing import zoo_input, zoo_model

ROWS = 60
BATCH = 6


def _die_once(flag: str) -> None:
    """Kill this worker process (no cleanup, like a crash) the first time only: the flag file goes first."""
    try:
        os.remove(flag)
    except FileNotFoundError:
        return
    os._exit(1)


@ray.remote(num_cpus=0)
def _expected(ref, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # a private copy, in the same kind of Ray worker (same thread count)
        return load_model_in_actor(ref, private_copy=True)(ids)


@ray.remote(num_cpus=0.5, max_restarts=1, max_task_retries=1)
class Scorer:
    def __init__(self, ref) -> None:
        self.model = load_model_in_actor(ref)

    def score(self, ids: torch.Tensor, flag: str, crash: bool) -> tuple[int, torch.Tensor]:
        if crash:
            _die_once(flag)
        with torch.no_grad():
            return os.getpid(), self.model(ids)


def test_actor_restart_reloads_and_finishes_every_row(ray_local, capsys):
    ref = prepare_model_for_actors(zoo_model("hard_cases"))
    ids = zoo_input(batch=ROWS, seed=3)
    expected = ray.get(_expected.remote(ref, ids))
    flag = tempfile.mktemp(prefix="rzc-crash-")
    open(flag, "w").close()
    actor = Scorer.remote(ref)
    batches = list(torch.split(ids, BATCH))
    crash_at = len(batches) // 2
    before = ray.get([actor.score.remote(b, flag, False) for b in batches[:crash_at]])
    after = ray.get([actor.score.remote(b, flag, True) for b in batches[crash_at:]])
    rows_before = sum(len(out) for _, out in before)
    rows_after = sum(len(out) for _, out in before + after)
    with capsys.disabled():
        print(f"\nactor restart: {rows_before} rows before the kill, {rows_after}/{ROWS} after")
    assert not os.path.exists(flag), "the actor never crashed"
    assert {pid for pid, _ in before}.isdisjoint({pid for pid, _ in after})  # a new process reloaded the model
    assert rows_after == ROWS
    assert torch.equal(torch.cat([out for _, out in before + after]), expected)


class DataScorer:
    """A Ray Data actor-pool UDF that crashes its process once, in the middle of the job."""

    def __init__(self, ref, flag: str) -> None:
        self.model = load_model_in_actor(ref)
        self.flag = flag

    def __call__(self, batch: dict) -> dict:
        if batch["row"][0] >= ROWS // 2:
            _die_once(self.flag)
        with torch.no_grad():
            out = self.model(torch.as_tensor(batch["ids"]))
        return {"row": batch["row"], "out": out.numpy(), "pid": np.full(len(out), os.getpid())}


def test_ray_data_actor_pool_survives_a_crash(ray_local, capsys):
    ref = prepare_model_for_actors(zoo_model("hard_cases"))
    ids = zoo_input(batch=ROWS, seed=4)
    expected = ray.get(_expected.remote(ref, ids))
    flag = tempfile.mktemp(prefix="rzc-crash-")
    open(flag, "w").close()
    ds = ray.data.from_items([{"row": i, "ids": ids[i].numpy()} for i in range(ROWS)], override_num_blocks=ROWS // BATCH)
    out = ds.map_batches(
        DataScorer, fn_constructor_kwargs={"ref": ref, "flag": flag}, batch_size=BATCH,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, max_restarts=-1, max_task_retries=-1,
    ).take_all()
    rows = sorted(out, key=lambda r: r["row"])
    pids = {int(r["pid"]) for r in rows}
    with capsys.disabled():
        print(f"\n[ray data] actor pool restart: {ROWS} rows in, {len(rows)} rows out, {len(pids)} worker processes")
    assert not os.path.exists(flag), "the actor never crashed"
    assert [r["row"] for r in rows] == list(range(ROWS))
    assert len(pids) >= 2  # the pool's actor was replaced and reloaded the model
    assert torch.equal(torch.as_tensor(np.stack([r["out"] for r in rows])), expected)


@ray.remote(num_cpus=0)
class Owner:
    """Prepares the model in its own process, so it owns the weights; killing it loses them."""

    def prepare(self, backend: str):
        return prepare_model_for_actors(zoo_model("hard_cases"), backend=backend)


@ray.remote(num_cpus=0, max_retries=0)
def _load(ref) -> str:
    load_model_in_actor(ref)
    return "loaded"


@pytest.mark.other_backends_slow  # each backend's get must let Ray's lost-object error through
def test_weights_gone_when_owner_died(ray_local, backend):
    owner = Owner.remote()
    ref = ray.get(owner.prepare.remote(backend))
    assert ray.get(_load.remote(ref)) == "loaded"
    ray.kill(owner)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(owner.prepare.remote(backend), timeout=60)  # the owner is dead now
    deadline = time.monotonic() + 60
    with pytest.raises(WeightsLostError) as info:
        while time.monotonic() < deadline:  # Ray frees a dead owner's objects asynchronously
            ray.get(_load.remote(ref), timeout=60)
            time.sleep(0.5)
    message = str(info.value)
    assert "OwnerDiedError" in message and "died" in message  # what happened
    assert "keep the process that prepared the model" in message and "prepare it again" in message  # what to do
