"""The original ray_zerocopy's usage, run against ours: pipelines found through ``dir()`` (``__slots__``),
its positional arguments where ours take ``backend``, and a ModelRef whose weights were freed."""

from __future__ import annotations

import gc
import pickle
import time

import pytest
import ray
import torch

from ray_zerocopy import (
    BackendArgumentError,
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
)


class SlotsPipeline:
    __slots__ = ("encoder", "decoder", "scale")

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(8, 16)
        self.decoder = torch.nn.Linear(16, 4)
        self.scale = 2.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)) * self.scale


class WithProperty:
    def __init__(self) -> None:
        self._model = torch.nn.Linear(4, 4)

    @property
    def model(self) -> torch.nn.Module:  # aliases _model: not a second model, and cannot be set
        return self._model


@ray.remote
def run_slots_pipeline(skeleton, refs, x):
    pipe = load_pipeline_in_actor(skeleton, refs)
    with torch.no_grad():
        return pipe(x)


def test_slots_pipeline_is_found_and_rebuilt_in_an_actor(ray_local):
    pipe = SlotsPipeline()
    skeleton, refs = rewrite_pipeline_for_actors(pipe)
    assert sorted(refs) == ["decoder", "encoder"]
    assert skeleton.encoder is None and skeleton.decoder is None and skeleton.scale == 2.0
    assert pipe.encoder is not None, "the caller's pipeline is untouched"
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = pipe(x)
    assert torch.equal(ray.get(run_slots_pipeline.remote(skeleton, refs, x)), expected)


def test_property_alias_is_not_a_second_model(ray_local):
    skeleton, refs = rewrite_pipeline_for_actors(WithProperty())
    assert list(refs) == ["_model"]
    assert isinstance(load_pipeline_in_actor(skeleton, refs).model, torch.nn.Linear)


@pytest.fixture
def ref(ray_local):
    return prepare_model_for_actors(torch.nn.Linear(4, 2))


def test_positional_use_fast_load_is_refused_naming_the_mix_up(ref):
    with pytest.raises(BackendArgumentError) as info:
        load_model_in_actor(ref, "cpu", True)
    msg = str(info.value)
    assert "backend=True" in msg and "use_fast_load" in msg and "keyword" in msg
    assert "prepare" not in msg, "must not suggest preparing again with backend=True"
    assert isinstance(info.value, TypeError) and info.value.value is True
    assert isinstance(load_model_in_actor(ref, "cpu", use_fast_load=True), torch.nn.Linear)


@pytest.mark.parametrize("value", [1, 0.5, torch.device("cpu"), "cuda:0", "cpu"])
def test_non_name_backends_are_refused_everywhere(ref, value):
    with pytest.raises(BackendArgumentError, match="use_fast_load"):
        load_model_in_actor(ref, None, value)
    with pytest.raises(BackendArgumentError, match="expected a backend name"):
        prepare_model_for_actors(torch.nn.Linear(2, 2), value)
    pipe = SlotsPipeline()
    with pytest.raises(BackendArgumentError, match="original ray_zerocopy it was `device`"):
        rewrite_pipeline_for_actors(pipe, None, value)  # the original: (pipeline, model_attr_names, device, ...)
    skeleton, refs = rewrite_pipeline_for_actors(pipe)
    with pytest.raises(BackendArgumentError, match="use_fast_load"):
        load_pipeline_in_actor(skeleton, refs, None, value)


@ray.remote
def load_timed(blob: bytes) -> tuple[str, str, float]:
    start = time.monotonic()
    try:
        load_model_in_actor(pickle.loads(blob))
        return "loaded", "", time.monotonic() - start
    except Exception as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start


def test_plainly_pickled_model_ref_loads_then_fails_fast_instead_of_hanging(ray_local):
    """A ModelRef pickled with the standard pickle module travels by name (keeper.py): it loads while
    the driver holds the ModelRef, and once the driver dropped it a load fails fast, never hangs."""
    ref = prepare_model_for_actors(torch.nn.Linear(64, 64))
    blob = pickle.dumps(ref)
    kind, msg, took = ray.get(load_timed.remote(blob), timeout=60)  # while the weights still exist
    assert kind == "loaded", msg
    del ref
    gc.collect()
    deadline = time.monotonic() + 30  # the keeper lets go within its grace period and poll interval
    while True:
        kind, msg, took = ray.get(load_timed.remote(blob), timeout=60)  # after the driver dropped it
        if kind != "loaded" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (kind, took < 5) == ("WeightsLostError", True), msg


def test_model_ref_passed_through_ray_still_loads(ref):
    assert ray.get(load_timed.remote(ray.cloudpickle.dumps(ref)))[0] == "loaded"  # Ray's cloudpickle tracks refs

    @ray.remote
    def load(r):
        return type(load_model_in_actor(r)).__name__

    assert ray.get(load.remote(ref)) == "Linear"
    assert ray.get(load.remote(ray.put(ref))) == "Linear"


@pytest.mark.parametrize("builtin", ["object_store", "packed", "safetensors"])
def test_weights_leave_the_store_when_the_model_ref_goes(ray_local, builtin):
    """Preparing must not pin the weights for the driver's life (Ray pins an ObjectRef for good once it
    is pickled outside its own serialization): dropping the last ModelRef frees them."""
    from test_serve import store_used, wait_for_store

    base = store_used()
    ref = prepare_model_for_actors(torch.nn.Linear(2048, 2048), backend=builtin)
    assert store_used() >= base + 16 * 2**20
    load_model_in_actor(ref)
    del ref
    gc.collect()
    assert wait_for_store(base + 2**20, timeout_s=20) <= base + 2**20
