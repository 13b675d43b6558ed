"""Issue 28: what used to give a silently different pipeline or a raw error now raises a typed error that names
the value and the fix (or works): refs that do not match a pipeline skeleton, the original's device= keyword,
a frozen dataclass pipeline, a damaged skeleton, a class importable only in the driver, a ModelRef of an ended
Ray session."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import ray
import torch
from conftest import RAY_INIT
from test_invoke_libraries import text_classifier

from ray_zerocopy.actor import load_model_in_actor, load_pipeline_in_actor, prepare_model_for_actors, rewrite_pipeline_for_actors
from ray_zerocopy.errors import (
    PipelineRefsError,
    PipelineRefsTypeError,
    SkeletonDamagedError,
    SkeletonImportError,
    UnexpectedArgumentError,
    WeightsLostError,
)
from ray_zerocopy.testing import zoo_input, zoo_model


def test_refs_under_names_the_skeleton_lacks_are_refused(ray_local, tmp_path):
    skeleton, refs = rewrite_pipeline_for_actors(text_classifier(tmp_path))
    with pytest.raises(PipelineRefsError, match=r"missing \['model'\], unknown to the skeleton \['zzz'\].*"
                       r"The skeleton's models: \['model'\].*Fix: pass the \{attribute name: ModelRef\} dict"):
        load_pipeline_in_actor(skeleton, {"zzz": refs["model"]})
    with pytest.raises(PipelineRefsError, match=r"no model refs given"):
        load_pipeline_in_actor(skeleton, {})
    with pytest.raises(PipelineRefsTypeError, match=r"must be a dict \{attribute name: ModelRef\}, got a list"):
        load_pipeline_in_actor(skeleton, list(refs.values()))
    with pytest.raises(PipelineRefsTypeError, match=r"values that are not ModelRefs: \{'model': 'str'\}"):
        load_pipeline_in_actor(skeleton, {"model": "not a ref"})
    assert isinstance(load_pipeline_in_actor(skeleton, refs).model, torch.nn.Module)


def test_refs_of_two_pipelines_mixed_are_refused(ray_local):
    class Two:
        def __init__(self) -> None:
            self.encoder, self.decoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    skeleton, refs = rewrite_pipeline_for_actors(Two())
    with pytest.raises(PipelineRefsError, match=r"missing \['decoder'\], unknown to the skeleton \[\]"):
        load_pipeline_in_actor(skeleton, {"encoder": refs["encoder"]})


def test_rewrite_pipeline_with_the_originals_device_keyword_says_where_device_goes(ray_local, tmp_path):
    with pytest.raises(UnexpectedArgumentError, match=r"rewrite_pipeline_for_actors\(\) does not take device='cpu'.*"
                       r"load_pipeline_in_actor\(skeleton, refs, device='cpu'\) in the actor"):
        rewrite_pipeline_for_actors(text_classifier(tmp_path), device="cpu")


@dataclasses.dataclass(frozen=True)
class FrozenPipeline:
    encoder: torch.nn.Module
    scale: float = 2.0


def test_frozen_dataclass_pipeline_is_prepared_and_loaded(ray_local):
    pipe = FrozenPipeline(zoo_model("hard_cases"))
    skeleton, refs = rewrite_pipeline_for_actors(pipe)
    assert skeleton.encoder is None and pipe.encoder is not None  # the caller's object is untouched
    loaded = load_pipeline_in_actor(skeleton, refs)
    with torch.no_grad():
        assert torch.equal(loaded.encoder(zoo_input()), pipe.encoder(zoo_input()))


def test_damaged_skeleton_is_a_typed_error(ray_local):
    ref = prepare_model_for_actors(zoo_model("hard_cases"))
    with pytest.raises(SkeletonDamagedError, match=r"bytes that are not a whole pickle.*Fix: pass the ModelRef"):
        load_model_in_actor(dataclasses.replace(ref, skeleton=ref.skeleton[: len(ref.skeleton) // 2]))


def test_class_importable_only_in_the_driver_says_runtime_env(ray_local, tmp_path, monkeypatch):
    (tmp_path / "driver_only_rzc28.py").write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 3)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver only: workers get the suite's PYTHONPATH
    from driver_only_rzc28 import Net  # type: ignore[import-not-found]

    ref = prepare_model_for_actors(Net())

    @ray.remote(num_cpus=0)
    def load(ref):
        load_model_in_actor(ref)

    with pytest.raises(SkeletonImportError, match=r"module 'driver_only_rzc28'.*not importable in this process.*"
                       r"runtime_env=\{'py_modules'"):
        try:
            ray.get(load.remote(ref))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
    sys.modules.pop("driver_only_rzc28", None)


@pytest.mark.slow  # (restarts Ray twice)
def test_model_ref_of_an_ended_session_says_so(ray_local):
    ref = prepare_model_for_actors(zoo_model("hard_cases"))
    ray.shutdown()
    try:
        ray.init(**RAY_INIT)
        message = r"prepared in Ray session 'session_.*', but this process is connected to Ray session 'session_.*"
        with pytest.raises(WeightsLostError, match=message):
            load_model_in_actor(ref)

        @ray.remote(num_cpus=0)
        def load(ref):
            return load_model_in_actor(ref)

        with pytest.raises(WeightsLostError, match=message):  # in the driver, before any task starts
            load.remote(ref)
    finally:
        del ref
        ray.shutdown()
        ray.init(**RAY_INIT)
