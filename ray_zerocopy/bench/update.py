"""``python -m ray_zerocopy bench --update``: one update round for N actors, three ways, in one run.

A round starts when the driver has a new version of the model in memory and ends when every actor answers
with the new weights (a checksum of the first and last weights, compared with the driver's):

- ``rzc-update``: ``prepare_model_for_actors(model, like=previous)`` then ``update_model_in_actor`` in every actor
  (the actors, their model objects and their processes stay);
- ``state-dict``: ``ray.put(model.state_dict())`` then ``model.load_state_dict(ray.get(ref))`` in every actor
  (each actor holds a private copy: the usual recipe of RL loops);
- ``redeploy``: ``prepare_model_for_actors(model)``, the old actors killed, N new ones started that load it
  (what a Serve redeploy does).

Node memory after the round: the object store plus every actor's private memory (PSS outside the store);
with ``--device cuda``, also the device memory the actors hold (``torch.cuda.memory_allocated``).
Each approach runs ``--repeats`` rounds; the report gives the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import ray
import torch

from ray_zerocopy.actor import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.bench.models import ModelSpec, build_model
from ray_zerocopy.bench.probe import process_memory
from ray_zerocopy.update import update_model_in_actor

APPROACHES = ("rzc-update", "state-dict", "redeploy")


def _checksum(model: torch.nn.Module) -> float:
    params = list(model.parameters())
    return float(params[0].double().sum() + params[-1].double().sum())


@ray.remote(num_cpus=0)
class _Server:
    def __init__(self, how: str, spec: ModelSpec, first: Any, device: str) -> None:
        self.how = how
        if how == "state-dict":  # a skeleton, then the state dict's tensors (a private copy of this actor)
            self.model = build_model(spec, meta=True)
            self.model.load_state_dict(ray.get(first[0]), assign=True)
            tie = getattr(self.model, "tie_weights", None)
            if callable(tie):
                tie()  # (assign=True unties what the skeleton tied)
            self.model.to(device)
        else:
            self.model = load_model_in_actor(first, device=device)

    def update(self, new: Any) -> float:
        if self.how == "state-dict":
            self.model.load_state_dict(ray.get(new[0]))
        else:
            update_model_in_actor(self.model, new)
        return _checksum(self.model)

    def answer(self) -> float:
        return _checksum(self.model)

    def private_bytes(self) -> tuple[int, int]:
        """(private host bytes, device bytes allocated by torch)."""
        device = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return int(process_memory()["pss"]), device


_Remote: Any = _Server  # (ray.remote made it an ActorClass: .remote)


def _store_bytes() -> int:
    from ray._private.internal_api import memory_summary

    line = next(x for x in memory_summary(ray.get_runtime_context().gcs_address, stats_only=True).splitlines()
                if "Plasma memory usage" in x)
    return int(line.split("Plasma memory usage")[1].split("MiB")[0]) * 2**20


def _publish(how: str, model: torch.nn.Module, previous: Any) -> Any:
    if how == "state-dict":
        return [ray.put(model.state_dict())]  # (in a list: the actor gets the ObjectRef, not a copy in its args)
    return prepare_model_for_actors(model, like=previous if how == "rzc-update" else None)


def _start(how: str, spec: ModelSpec, version: Any, device: str, actors: int) -> Any:
    gpus = 0.5 / actors if device.startswith("cuda") else 0  # (old and new actors fit one GPU during a redeploy)
    return _Remote.options(num_gpus=gpus).remote(how, spec, version, device)


def _round(how: str, model: torch.nn.Module, spec: ModelSpec, actors: list, previous: Any,
           device: str) -> tuple[float, list, Any]:
    """One update round: (seconds until every actor answers with the new weights, the actors, the new version)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)  # the new version (the old one is a snapshot in the store)
    expected = _checksum(model)
    start = time.perf_counter()
    new = _publish(how, model, previous)
    if how == "redeploy":
        for a in actors:
            ray.kill(a)
        actors = [_start(how, spec, new, device, len(actors)) for _ in actors]
        got = ray.get([a.answer.remote() for a in actors])
    else:
        got = ray.get([a.update.remote(new) for a in actors])
    seconds = time.perf_counter() - start
    if any(abs(g - expected) > 1e-6 * max(1.0, abs(expected)) for g in got):
        raise RuntimeError(f"{how}: an actor answered with other weights ({got} != {expected})")
    return seconds, actors, new


def run_updates(spec: ModelSpec, actors: int, repeats: int, approaches: tuple[str, ...] = APPROACHES,
                progress: Any = print, device: str = "cpu") -> tuple[int, list[dict[str, Any]]]:
    """Run ``repeats`` update rounds of each approach with ``actors`` actors on ``device`` (starts a local Ray
    sized for the model); the model's bytes and one result dict per approach."""
    model = build_model(spec)
    model_bytes = sum(t.nbytes for t in {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values())
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(8, actors), object_store_memory=3 * model_bytes + 2**28,
                 include_dashboard=False, log_to_driver=False)
    results = []
    for how in approaches:
        first = _publish(how, model, None)
        servers = [_start(how, spec, first, device, actors) for _ in range(actors)]
        ray.get([s.answer.remote() for s in servers])
        times, previous = [], first
        for i in range(repeats):
            seconds, servers, previous = _round(how, model, spec, servers, previous, device)
            times.append(seconds)
            progress(f"{how}: round {i + 1}/{repeats} {seconds:.3f} s")
        time.sleep(2)  # (Ray frees the old versions asynchronously)
        private, on_device = (sum(b) for b in zip(*ray.get([s.private_bytes.remote() for s in servers])))
        results.append({"name": how, "median_s": statistics.median(times), "times_s": times,
                        "store_bytes": _store_bytes(), "actors_private_bytes": private,
                        "actors_device_bytes": on_device})
        for s in servers:
            ray.kill(s)
        del first, previous
    return model_bytes, results


def format_updates(results: list[dict[str, Any]], model_bytes: int, actors: int) -> str:
    lines = [f"update round, {actors} actors, model {model_bytes / 1e9:.2f} GB (median of {len(results[0]['times_s'])})",
             f"{'approach':<12} {'round s':>9} {'store GB':>9} {'actors GB':>10} {'node GB':>8} {'device GB':>10}"]
    for r in results:
        node = r["store_bytes"] + r["actors_private_bytes"]
        lines.append(f"{r['name']:<12} {r['median_s']:>9.3f} {r['store_bytes'] / 1e9:>9.2f} "
                     f"{r['actors_private_bytes'] / 1e9:>10.2f} {node / 1e9:>8.2f} "
                     f"{r.get('actors_device_bytes', 0) / 1e9:>10.2f}")
    return "\n".join(lines)
