"""Where and from what ``prepare_model_for_actors`` writes the weights: from the model or from checkpoint
files, in the driver or in a small owner actor pinned to a chosen node.

With ``node=`` the weights never pass through the driver's node: an owner actor on that node reads
the checkpoint there and ``ray.put``s the weights itself, so it owns them and they live in that
node's object store. The ModelRef holds the owner's handle: the owner lives while any copy of the
ModelRef does, and when the last one goes, Ray ends the owner and frees the weights (the lifetime
of weights put by the driver). An owner that dies makes loads raise ``WeightsLostError``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_zerocopy import _progress
from ray_zerocopy._tensors import SplitModel
from ray_zerocopy.backend import Backend, Payload
from ray_zerocopy.checkpoint import checkpoint_files, match, read_specs, weights_from
from ray_zerocopy.errors import PrepareNodeError


@dataclass(frozen=True)
class Stored:
    payload: Payload
    layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    owner: Any  # the owner actor's handle, or None where the caller owns the weights


def store_weights(backend: Backend, split: SplitModel, checkpoint: str | os.PathLike | None,
                  node: str | None, progress: bool | None) -> Stored:
    """Write the split's weights (or the checkpoint's, matched to them) into the object store."""
    if checkpoint is None:
        if node is not None:
            raise PrepareNodeError(node, "needs checkpoint= (a model built in the driver is in the driver's memory, "
                                   "and sending it to another node would put it in this node's object store first)",
                                   "save the model (save_pretrained / safetensors) where that node can read it "
                                   "and pass checkpoint=PATH, or leave node=None")
        return Stored(_put(backend, split.weights, None, progress, ""), dict(split.layouts), None)
    checkpoint = os.fspath(checkpoint)
    owner = None if node is None else start_owner(node)
    specs = read_specs(checkpoint) if owner is None else ray.get(owner.specs.remote(checkpoint))
    sources = match(split, specs, checkpoint)
    # what the checkpoint fills is opened from the files where the weights are written
    own = {k: None if k in sources else t for k, t in split.weights.items()}
    layouts = {k: v for k, v in split.layouts.items() if k not in sources}  # checkpoint tensors are contiguous
    if owner is None:
        return Stored(_put(backend, weights_from(checkpoint, own, sources), checkpoint, progress, ""), layouts, None)
    payload = ray.get(owner.put.remote(backend.name, checkpoint, own, sources, progress))
    return Stored(payload, layouts, owner)


def _put(backend: Backend, weights: Mapping[str, torch.Tensor], checkpoint: str | None,
         progress: bool | None, where: str) -> Payload:
    nbytes = sum(t.nbytes for t in weights.values())
    show = _progress.wanted(progress, nbytes)
    if show and checkpoint is not None:
        _progress.read_through(checkpoint_files(checkpoint))
    start = time.perf_counter()
    payload = backend.put(weights)
    if show:
        _progress.report_store(nbytes, time.perf_counter() - start, where)
    return payload


@ray.remote(num_cpus=0, max_restarts=0)
class WeightsOwner:
    """Reads a checkpoint on its node and owns the objects it puts there (see the module docstring)."""

    def specs(self, checkpoint: str) -> dict:
        return read_specs(checkpoint)

    def put(self, backend: str, checkpoint: str, own: Mapping[str, torch.Tensor | None],
            sources: Mapping[str, str], progress: bool | None) -> Payload:
        from ray_zerocopy.plugins import get_backend

        node = ray.get_runtime_context().get_node_id()
        return _put(get_backend(backend), weights_from(checkpoint, own, sources), checkpoint, progress,
                    f" of node {node[:12]}")


def start_owner(node: str) -> Any:
    """An owner actor pinned to ``node`` (a node ID, as ``ray.get_runtime_context().get_node_id()`` gives).

    Raises:
        PrepareNodeError: ``node`` is not an alive node of the cluster.
    """
    alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    if node not in alive:
        listed = ", ".join(f"{k} ({n.get('NodeManagerAddress')}, object store "
                           f"{n.get('Resources', {}).get('object_store_memory', 0) / 2**30:.1f} GiB)"
                           for k, n in alive.items())
        raise PrepareNodeError(node, f"is not an alive node of this cluster; alive: {listed}",
                               "pass one of those node IDs (ray.nodes()[i]['NodeID'], or "
                               "ray.get_runtime_context().get_node_id() in a task running there)")
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return WeightsOwner.options(scheduling_strategy=strategy).remote()  # type: ignore[attr-defined]  # (an ActorClass)
