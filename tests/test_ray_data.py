"""Ray Data end to end: an actor pool sharing one model gives the right prediction for every row."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from ray.data import ActorPoolStrategy

from ray_zerocopy.actor import (
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
)
from ray_zerocopy.testing import zoo_model

ROWS = 64


class InferenceActor:
    def __init__(self, model_ref, device: str = "cpu"):
        self.model = load_model_in_actor(model_ref, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits = self.model(torch.as_tensor(batch["ids"]))
        return {"row": batch["row"], "pred": logits.argmax(-1).numpy()}


class Pipeline:
    """Two models plus pre- and post-processing, as users write them."""

    def __init__(self):
        self.encoder = zoo_model("hard_cases", seed=1)
        self.reranker = zoo_model("hard_cases", seed=2)
        self.offset = 3  # plain state travels with the skeleton

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.encoder(ids + self.offset) + self.reranker(ids)).argmax(-1)


class PipelineActor:
    def __init__(self, skeleton, model_refs):
        self.pipeline = load_pipeline_in_actor(skeleton, model_refs)

    def __call__(self, batch):
        return {"row": batch["row"], "pred": self.pipeline(torch.as_tensor(batch["ids"])).numpy()}


def _rows() -> ray.data.Dataset:
    ids = np.random.default_rng(0).integers(0, 50, size=(ROWS, 8))
    return ray.data.from_items([{"row": i, "ids": ids[i]} for i in range(ROWS)])


@ray.remote
def _expected(fn, ds_rows):
    """The reference predictions, computed in a worker like the actors (same float rounding)."""
    ids = torch.as_tensor(np.stack([r["ids"] for r in ds_rows]))
    return fn(ids).numpy()


def _check(out: list[dict], expected: np.ndarray) -> None:
    assert sorted(r["row"] for r in out) == list(range(ROWS)), "rows lost or duplicated"
    got = np.array([r["pred"] for r in sorted(out, key=lambda r: r["row"])])
    np.testing.assert_array_equal(got, expected)


def test_map_batches_actor_pool(ray_local):
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    ds = _rows()
    out = ds.map_batches(
        InferenceActor, fn_constructor_kwargs={"model_ref": ref, "device": "cpu"},
        batch_size=8, compute=ActorPoolStrategy(size=4), num_cpus=1,
    ).take_all()

    def predict(ids):
        with torch.no_grad():
            return model(ids).argmax(-1)

    _check(out, ray.get(_expected.remote(predict, ds.take_all())))


def test_map_batches_pipeline(ray_local):
    pipeline = Pipeline()
    skeleton, refs = rewrite_pipeline_for_actors(pipeline)
    assert skeleton.encoder is None and skeleton.offset == 3 and set(refs) == {"encoder", "reranker"}
    assert pipeline.encoder is not None, "the caller's pipeline must not be modified"
    ds = _rows()
    out = ds.map_batches(
        PipelineActor, fn_constructor_kwargs={"skeleton": skeleton, "model_refs": refs},
        batch_size=16, compute=ActorPoolStrategy(size=2), num_cpus=1,
    ).take_all()
    _check(out, ray.get(_expected.remote(pipeline, ds.take_all())))


def test_pipeline_shares_a_model_held_twice(ray_local):
    pipeline = Pipeline()
    pipeline.reranker = pipeline.encoder
    _, refs = rewrite_pipeline_for_actors(pipeline)
    assert refs["encoder"] is refs["reranker"]

    @ray.remote
    def load(skeleton, refs):
        p = load_pipeline_in_actor(skeleton, refs)
        return p.encoder is p.reranker

    assert ray.get(load.remote(*rewrite_pipeline_for_actors(pipeline)))


def test_module_pipeline_is_not_modified(ray_local):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = zoo_model("hard_cases")
            self.b = torch.nn.Linear(4, 4)

    wrapper = Wrapper()
    skeleton, refs = rewrite_pipeline_for_actors(wrapper, model_attr_names=["a"])
    assert isinstance(wrapper.a, torch.nn.Module) and skeleton.a is None and "a" not in skeleton._modules
    rebuilt = ray.get(ray.remote(lambda s, r: type(load_pipeline_in_actor(s, r).a).__name__).remote(skeleton, refs))
    assert rebuilt == "HardCases"


@pytest.mark.parametrize("names", [None, ["offset"]])
def test_pipeline_errors(ray_local, names):
    from ray_zerocopy import NoModelsError, NotAModuleError

    class Empty:
        offset = 1

    with pytest.raises(NotAModuleError if names else NoModelsError, match="Fix:"):
        rewrite_pipeline_for_actors(Empty() if names is None else Pipeline(), model_attr_names=names)
