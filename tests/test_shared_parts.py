"""Tensor data outside parameters and buffers is shared, not copied into every actor; a submodule that
two models of a pipeline share is stored once and comes back as one module."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import ray
import torch

from ray_zerocopy import (
    SharedWeightWriteError,
    UnsupportedModelError,
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
)
from ray_zerocopy.load import member_of

MiB = 1024**2


class WithTable(torch.nn.Module):
    """A 16 MiB plain tensor attribute (not a parameter or buffer), and smaller ones in a list and a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(1024, 8)
        self.table = torch.randn(4096, 1024)
        self.scales = [torch.rand(1024), torch.rand(1024)]
        self.offsets = {"a": torch.rand(8)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table[ids] * self.scales[0] * self.scales[1]) + self.offsets["a"]


def old_weight_norm_model() -> torch.nn.Module:
    """torch.nn.utils.weight_norm (hook-based, deprecated): ``weight`` is a plain attribute recomputed
    from weight_g and weight_v by a forward pre-hook."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layer = torch.nn.utils.weight_norm(torch.nn.Linear(2048, 1024))
    return torch.nn.Sequential(layer, torch.nn.ReLU())


@ray.remote
def run(ref, x):
    model = load_model_in_actor(ref)
    with torch.no_grad():
        return model(x)


def test_plain_tensor_attributes_are_shared_not_pickled(ray_local):
    model = WithTable()
    ref = prepare_model_for_actors(model)
    assert len(ref.skeleton) < 64 * 1024, "the 16 MiB table must not travel in the skeleton (copied into every actor)"
    assert ref.nbytes >= 16 * MiB
    ids = torch.tensor([0, 5, 4095])
    with torch.no_grad():
        expected = model(ids)
    out = ray.get(run.remote(ref, ids))
    assert torch.equal(out, expected)
    loaded = load_model_in_actor(ref)
    assert torch.equal(loaded.table, model.table) and type(loaded.table) is torch.Tensor
    assert [torch.equal(a, b) for a, b in zip(loaded.scales, model.scales)] == [True, True]
    assert torch.equal(loaded.offsets["a"], model.offsets["a"])
    # zero-copy: the table is a view into the object store, not a private copy
    from ray_zerocopy.testing import tensors_outside_shared_memory

    assert tensors_outside_shared_memory(loaded) == []
    assert loaded.table.data_ptr() != model.table.data_ptr()


def test_hook_based_weight_norm_is_right_and_ships_no_weight_in_the_skeleton(ray_local):
    model = old_weight_norm_model()
    ref = prepare_model_for_actors(model)
    assert len(ref.skeleton) < 64 * 1024, "the derived weight (8 MiB) must not be pickled into every actor"
    x = torch.randn(3, 2048)
    with torch.no_grad():
        expected = model(x)
    out = ray.get(run.remote(ref, x))
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    loaded = load_model_in_actor(ref)
    with torch.no_grad():
        loaded(x)
        loaded(x)  # the hook recomputes weight on every call, into fresh private memory, never in place
    assert torch.allclose(loaded[0].weight, model[0].weight.detach())


class Encoder(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding) -> None:
        super().__init__()
        self.embed, self.mix = embed, torch.nn.Linear(64, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(ids))


class Decoder(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding) -> None:
        super().__init__()
        self.embed, self.norm = embed, torch.nn.BatchNorm1d(64)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.transpose(1, 2)).transpose(1, 2) @ self.embed.weight.T


class SharedEmbedPipeline:
    def __init__(self) -> None:
        torch.manual_seed(0)
        embed = torch.nn.Embedding(8192, 64)  # 2 MiB, held by both models
        self.encoder, self.decoder = Encoder(embed), Decoder(embed)
        self.encoder.eval(), self.decoder.eval()
        self.other = torch.nn.Linear(4, 4)  # shares nothing

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(ids))


@ray.remote
def run_pipeline(skeleton, refs, ids):
    pipe = load_pipeline_in_actor(skeleton, refs)
    with torch.no_grad():
        out = pipe(ids)
    return out, pipe.encoder.embed is pipe.decoder.embed, pipe.encoder.embed.weight is pipe.decoder.embed.weight


def test_submodule_shared_by_two_models_is_stored_once_and_stays_shared(ray_local):
    pipe = SharedEmbedPipeline()
    skeleton, refs = rewrite_pipeline_for_actors(pipe)
    assert set(refs) == {"encoder", "decoder", "other"}
    embed_bytes = pipe.encoder.embed.weight.nbytes
    own = sum(t.nbytes for m in (pipe.encoder, pipe.decoder, pipe.other) for t in [*m.parameters(), *m.buffers()])
    stored = {r.uid: r.nbytes for r in refs.values()}  # models prepared together share one ModelRef's weights
    assert sum(stored.values()) == own - embed_bytes, "the shared embedding must be stored once"
    ids = torch.tensor([[1, 2, 3], [4, 5, 8191]])
    with torch.no_grad():
        expected = pipe(ids)
    out, same_module, same_weight = ray.get(run_pipeline.remote(skeleton, refs, ids))
    assert same_module and same_weight
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4)  # (1 thread in the actor)


def test_a_model_of_a_group_loads_alone_and_writes_stay_private(ray_local):
    pipe = SharedEmbedPipeline()
    _, refs = rewrite_pipeline_for_actors(pipe)
    decoder = load_model_in_actor(refs["decoder"])
    assert type(decoder) is Decoder and torch.equal(decoder.embed.weight, pipe.decoder.embed.weight)
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(decoder(h), pipe.decoder(h), rtol=1e-5, atol=1e-4)  # (BLAS paths vary with alignment)
    decoder.train()  # BatchNorm in train mode updates its running statistics: copy-on-write, this load only
    decoder(h)
    again = load_model_in_actor(refs["decoder"])
    assert all(torch.equal(again.state_dict()[k], v) for k, v in pipe.decoder.state_dict().items())


def test_hooks_of_the_group_run_for_each_model(ray_local):
    """A hook the loader puts on a loaded group (the share_gpu write check) runs for each model of the
    group, which is called instead of the group."""
    from ray_zerocopy.guard import guard_model

    _, refs = rewrite_pipeline_for_actors(SharedEmbedPipeline())
    group = load_model_in_actor(dataclasses.replace(refs["encoder"], member=None))
    guard_model(group, [("0.mix.bias", group[0].mix.bias)])
    encoder = member_of(group, 0)
    with torch.no_grad():
        encoder(torch.tensor([[1, 2]]))
        encoder.mix.bias.add_(1)
    with pytest.raises(SharedWeightWriteError, match="mix.bias"):
        encoder(torch.tensor([[1, 2]]))


class WithSparse(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.adjacency = torch.eye(512).to_sparse()  # cannot travel as plain bytes


def test_plain_tensor_that_cannot_be_shared_is_refused_with_its_name_and_size(ray_local):
    with pytest.raises(UnsupportedModelError) as info:
        prepare_model_for_actors(WithSparse())
    msg = str(info.value)
    assert "tensor 'adjacency' (1.00 MiB, Tensor, torch.sparse_coo, torch.float32)" in msg
    assert "every actor would get its own copy" in msg and ".to_dense()" in msg
