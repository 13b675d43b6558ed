"""Issue 28, item 3: no silent per-actor copy. Models in dict, list or tuple attributes of a pipeline are shared like
models held directly; a model hidden inside another object is refused in the driver; a tensor attribute that views a
parameter stays a view of it after load; a submodule shared by pipeline models (through a container too) is stored
once."""

from __future__ import annotations

import pytest
import ray
import torch
from test_shared_parts import Encoder

from ray_zerocopy import (
    HiddenModelError,
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
)
from ray_zerocopy.testing import tensors_outside_shared_memory
from ray_zerocopy.update import update_pipeline_in_actor

MiB = 1024**2


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(4096, 64), torch.nn.Linear(64, 64), torch.nn.GELU()).eval()  # 1 MiB


class Containers:
    """A model held directly, and others in a dict, a list and a tuple attribute."""

    def __init__(self) -> None:
        self.direct = mlp(0)
        self.by_name = {"first": mlp(1), "n": 3}
        self.stack = [mlp(2), "not a model"]
        self.pair = (mlp(3),)

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        models = [self.direct, self.by_name["first"], self.stack[0], self.pair[0]]
        return [m(ids) for m in models]


@ray.remote
def run_containers(skeleton, refs, ids):
    pipe = load_pipeline_in_actor(skeleton, refs)
    models = [pipe.direct, pipe.by_name["first"], pipe.stack[0], pipe.pair[0]]
    with torch.no_grad():
        return pipe(ids), [tensors_outside_shared_memory(m) for m in models], pipe.by_name["n"], pipe.stack[1]


def test_models_in_dict_list_and_tuple_attributes_are_shared_not_pickled(ray_local):
    pipe = Containers()
    by_name, stack, pair = pipe.by_name, pipe.stack, pipe.pair
    skeleton, refs = rewrite_pipeline_for_actors(pipe)
    assert set(refs) == {"direct", "by_name['first']", "stack[0]", "pair[0]"}
    assert len(ray.cloudpickle.dumps(skeleton)) < 64 * 1024, "no model may travel in the skeleton (a copy per actor)"
    assert all(r.nbytes > MiB for r in refs.values())
    # the caller's pipeline and containers are unchanged; the skeleton holds copies with None in the models' places
    assert pipe.by_name is by_name and isinstance(by_name["first"], torch.nn.Module) and isinstance(stack[0], torch.nn.Module)
    assert pipe.pair is pair and isinstance(pair[0], torch.nn.Module)
    assert skeleton.by_name == {"first": None, "n": 3} and skeleton.stack == [None, "not a model"] and skeleton.pair == (None,)
    ids = torch.tensor([[1, 5, 7, 4095]])
    with torch.no_grad():
        expected = pipe(ids)
    out, outside, n, text = ray.get(run_containers.remote(skeleton, refs, ids))
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert outside == [[], [], [], []], "every model's weights are views into the object store"
    assert (n, text) == (3, "not a model")
    loaded = load_pipeline_in_actor(skeleton, refs)
    assert skeleton.by_name["first"] is None, "loading fills a copy of the skeleton's container"
    _, refs_v2 = rewrite_pipeline_for_actors(Containers())  # same weights again: an update by container names works
    assert update_pipeline_in_actor(loaded, refs_v2) is loaded


class Holder:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


class Hidden:
    def __init__(self) -> None:
        self.direct = torch.nn.Linear(8, 8)
        self.helper = Holder(torch.nn.Linear(512, 512))  # a model inside another object


def test_model_inside_another_object_is_refused_with_its_path(ray_local):
    with pytest.raises(HiddenModelError) as info:
        rewrite_pipeline_for_actors(Hidden())
    msg = str(info.value)
    assert info.value.path == "helper.model" and info.value.model_type == "Linear"
    assert "a Linear (1.00 MiB of weights) at 'helper.model'" in msg
    assert "every actor would get its own copy" in msg and "Fix: hold the model only as an attribute of the pipeline" in msg
    shared = Hidden()
    shared.helper.model = shared.direct  # a prepared model held again inside another object
    with pytest.raises(HiddenModelError, match=r"a Linear \(0.00 MiB of weights\) at 'helper.model', inside an object"):
        rewrite_pipeline_for_actors(shared)
    nested = Hidden()
    nested.helper.model = torch.nn.Sequential(torch.nn.Linear(512, 512))
    with pytest.raises(HiddenModelError, match=r"a Sequential .* at 'helper.model'"):
        rewrite_pipeline_for_actors(nested)
    # a model attribute left out by an explicit model_attr_names stays the caller's choice
    skeleton, refs = rewrite_pipeline_for_actors(Containers(), model_attr_names=["direct"])
    assert set(refs) == {"direct"} and isinstance(skeleton.stack[0], torch.nn.Module)
    skeleton, refs = rewrite_pipeline_for_actors(Containers(), model_attr_names=["by_name['first']"])
    assert set(refs) == {"by_name['first']"} and skeleton.by_name["first"] is None


class SharedThroughDict:
    def __init__(self) -> None:
        torch.manual_seed(0)
        embed = torch.nn.Embedding(16384, 64)  # 4 MiB, held by the model attribute and by the model in the dict
        self.encoder = Encoder(embed)
        self.heads = {"decoder": Encoder(embed)}


@ray.remote
def shared_in_actor(skeleton, refs):
    pipe = load_pipeline_in_actor(skeleton, refs)
    return pipe.encoder.embed is pipe.heads["decoder"].embed


def test_submodule_shared_through_a_dict_attribute_is_stored_once(ray_local):
    pipe = SharedThroughDict()
    skeleton, refs = rewrite_pipeline_for_actors(pipe)
    assert set(refs) == {"encoder", "heads['decoder']"}
    unique = {t.untyped_storage().data_ptr(): t.nbytes for m in (pipe.encoder, pipe.heads["decoder"])
              for t in m.parameters()}
    stored = {r.uid: r.nbytes for r in refs.values()}
    assert sum(stored.values()) == sum(unique.values()) < 4.1 * MiB, "the 4 MiB embedding is stored once"
    assert len(ray.cloudpickle.dumps(skeleton)) < 64 * 1024
    assert ray.get(shared_in_actor.remote(skeleton, refs)), "the shared embedding is one module in the actor"


class Views(torch.nn.Module):
    """Tensor attributes that view a parameter: a slice and a transpose."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(512, 512)  # 1 MiB weight
        self.half = self.linear.weight[256:]
        self.w_t = self.linear.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w_t + (x[:, 256:] @ self.half).sum()


def _inside(t: torch.Tensor, base: torch.Tensor) -> bool:
    start = base.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + base.nbytes


@ray.remote
def views_in_actor(ref, x):
    model = load_model_in_actor(ref)
    w = model.linear.weight
    with torch.no_grad():
        out = model(x)
    return out, _inside(model.half, w), model.half.data_ptr() - w.data_ptr(), model.w_t.data_ptr() == w.data_ptr()


def test_tensor_attribute_viewing_a_parameter_stays_a_view_of_it(ray_local):
    model = Views()
    ref = prepare_model_for_actors(model)
    assert ref.nbytes == sum(p.nbytes for p in model.parameters()), "a view is not stored a second time"
    x = torch.randn(3, 512)
    with torch.no_grad():
        expected = model(x)
    out, inside, offset, transposed = ray.get(views_in_actor.remote(ref, x))
    assert torch.equal(out, expected)
    assert inside and offset == 256 * 512 * 4 and transposed
    loaded = load_model_in_actor(ref, private_copy=True)  # writable: an in-place write shows through the views
    assert loaded.w_t.stride() == model.w_t.stride() and torch.equal(loaded.half, model.half)
    with torch.no_grad():
        loaded.linear.weight[300, 7] = 42.0
    assert loaded.half[44, 7] == 42.0 and loaded.w_t[7, 300] == 42.0
