"""Preparing from checkpoint files: a meta-device skeleton, weights streamed from safetensors files.

A bf16 Llama-shaped model saved with ``save_pretrained`` (sharded, tied embeddings) prepared from its
folder gives outputs bit-identical to ``from_pretrained`` in an actor on every backend, ties tied;
mismatches are typed errors naming each tensor; progress shows and can be silenced.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ray_zerocopy import (
    CheckpointError,
    CheckpointMismatchError,
    load_model_in_actor,
    prepare_model_for_actors,
    put_joined,
)
from ray_zerocopy._stream import GLUE_BUDGET, SMALL, _Span, pieces
from ray_zerocopy.hf import build_skeleton, prepare_pretrained

CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A sharded bf16 checkpoint folder (model.safetensors.index.json + shards), tied embeddings."""
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("llama"))
    LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    return folder


def _skeleton(folder: str) -> torch.nn.Module:
    with init_empty_weights():
        model = LlamaForCausalLM._from_config(LlamaConfig.from_pretrained(folder), dtype=torch.bfloat16)
    model.tie_weights()
    return model


IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


@ray.remote(num_cpus=1)
def _run_loaded(ref) -> tuple[torch.Tensor, bool, list[str]]:
    model = load_model_in_actor(ref)
    with torch.no_grad():
        logits = model(IDS).logits
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    return logits, model.lm_head.weight is model.model.embed_tokens.weight, on_meta


@pytest.mark.other_backends_slow  # each backend's put reads the checkpoint's file-backed tensors
def test_sharded_checkpoint_matches_from_pretrained(ray_local, backend, llama_dir):
    expected = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = expected(IDS).logits
    skeleton = _skeleton(llama_dir)
    ref = prepare_model_for_actors(skeleton, backend=backend, checkpoint=llama_dir)
    logits, tied, on_meta = ray.get(_run_loaded.remote(ref))
    assert torch.equal(logits, want)
    assert tied and on_meta == []
    assert skeleton.lm_head.weight.is_meta  # the caller's skeleton is left as it was


def test_prepare_pretrained_single_file(ray_local, tmp_path):
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    ref = prepare_pretrained(tmp_path, AutoModelForCausalLM, backend="packed")
    logits, tied, _ = ray.get(_run_loaded.remote(ref))
    with torch.no_grad():
        assert torch.equal(logits, LlamaForCausalLM.from_pretrained(tmp_path).eval()(IDS).logits)
    assert tied
    assert build_skeleton(tmp_path).lm_head.weight.dtype == torch.bfloat16  # class and dtype from the config


def test_single_safetensors_file(ray_local, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    ref = prepare_model_for_actors(skeleton, backend="safetensors", checkpoint=tmp_path / "w.safetensors")
    x = torch.randn(3, 8)
    assert torch.equal(load_model_in_actor(ref)(x), model(x))


def _write_variant(src: str, dst, change) -> str:
    """A copy of the checkpoint's tensors in one file, changed by ``change(dict)``."""
    tensors = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, name)))
    change(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_mismatches_are_named(ray_local, llama_dir, tmp_path):
    def change(t: dict) -> None:
        del t["model.layers.0.mlp.up_proj.weight"]
        t["model.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = t["model.norm.weight"].float()
        t["model.layers.1.mlp.down_proj.weight"] = t["model.layers.1.mlp.down_proj.weight"][:, :8].contiguous()

    bad = _write_variant(llama_dir, tmp_path, change)
    used_before = ray.available_resources().get("object_store_memory")
    with pytest.raises(CheckpointMismatchError) as info:
        prepare_model_for_actors(_skeleton(llama_dir), backend="packed", checkpoint=bad)
    err = info.value
    assert err.missing == ["model.layers.0.mlp.up_proj.weight"]
    assert err.unexpected == ["model.extra.weight"]
    assert {m[0] for m in err.mismatched} == {"model.norm.weight", "model.layers.1.mlp.down_proj.weight"}
    assert ("model.norm.weight", ("bfloat16", (128,)), ("float32", (128,))) in err.mismatched
    for name in ("up_proj", "model.extra.weight", "float32[128]", "[128, 8]", "Fix:"):
        assert name in str(err)
    assert isinstance(err, ValueError)
    # nothing was stored (objects of earlier tests may still be going: free memory may only grow)
    assert ray.available_resources().get("object_store_memory") >= used_before


def test_untied_skeleton_names_the_missing_tie(ray_local, llama_dir):
    with init_empty_weights():
        skeleton = LlamaForCausalLM._from_config(LlamaConfig.from_pretrained(llama_dir), dtype=torch.bfloat16)
    skeleton.lm_head.weight = torch.nn.Parameter(torch.empty_like(skeleton.lm_head.weight, device="meta"))
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        prepare_model_for_actors(skeleton, checkpoint=llama_dir)


def test_buffers_left_on_meta_are_an_error(ray_local, llama_dir):
    with torch.device("meta"):  # unlike init_empty_weights, this puts the rotary buffers on meta too
        skeleton = LlamaForCausalLM._from_config(LlamaConfig.from_pretrained(llama_dir), dtype=torch.bfloat16)
    skeleton.tie_weights()
    with pytest.raises(CheckpointMismatchError) as info:
        prepare_model_for_actors(skeleton, checkpoint=llama_dir)
    assert "model.rotary_emb.inv_freq" in info.value.missing and not info.value.unexpected


def test_meta_without_checkpoint_is_still_refused(ray_local, llama_dir):
    from ray_zerocopy import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="meta"):
        prepare_model_for_actors(_skeleton(llama_dir))


def test_bad_checkpoint_paths(ray_local, tmp_path, llama_dir):
    skeleton = _skeleton(llama_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        prepare_model_for_actors(skeleton, checkpoint=tmp_path / "nope")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        prepare_model_for_actors(skeleton, checkpoint=tmp_path)
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        prepare_model_for_actors(skeleton, checkpoint=tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        prepare_model_for_actors(skeleton, checkpoint=tmp_path)


def test_progress_shows_and_is_silenced(ray_local, llama_dir, capsys, monkeypatch):
    prepare_model_for_actors(_skeleton(llama_dir), checkpoint=llama_dir, progress=True)
    err = capsys.readouterr().err
    assert "reading checkpoint: 100%" in err and "GB/s" in err and "stored" in err
    prepare_model_for_actors(_skeleton(llama_dir), checkpoint=llama_dir, progress=False)
    monkeypatch.setattr("ray_zerocopy._progress.SHOW_FROM", 1)
    monkeypatch.setenv("RAY_ZEROCOPY_PROGRESS", "0")
    prepare_model_for_actors(_skeleton(llama_dir), checkpoint=llama_dir)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RAY_ZEROCOPY_PROGRESS")
    prepare_model_for_actors(torch.nn.Linear(4, 4))  # the default shows it for models past SHOW_FROM
    assert "stored" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", [[0], [1], [3, 61, 64, 65], [2047, 2048, 2049], [100, 5000, 7, 70001, 1],
                                   [64] * 40, [5] * 100 + [4096], [16383, 16384, 16385, 3, 100000],
                                   [3072] * 300 + [1 << 20] + [3072] * 3])
def test_put_joined_is_one_zero_copy_buffer(ray_local, sizes):
    rng = np.random.default_rng(len(sizes))
    segments = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
    got = ray.get(put_joined(segments))
    assert np.array_equal(got, np.concatenate(segments))
    if got.nbytes:
        assert isinstance(got.base, _Span) and not got.flags.writeable  # a view of the object, no copy


def test_pieces_glue_small_segments_and_keep_large_ones_as_views():
    """Small tensors are copied into a few glue pieces (each piece costs a load's ray.get); large ones
    travel as views of themselves; the copies stay under the glue budget."""
    small = [np.full(3072, i % 256, np.uint8) for i in range(300)]
    large = np.arange(1 << 20, dtype=np.uint64).view(np.uint8)[: (1 << 20) + 5]
    parts = pieces([*small, large, *small[:3]])
    assert np.array_equal(np.concatenate(parts), np.concatenate([*small, large, *small[:3]]))
    assert len(parts) <= 60 and any(np.shares_memory(p, large) and len(p) > (1 << 20) - 128 for p in parts)
    many = pieces([np.zeros(SMALL - 64, np.uint8) for _ in range(GLUE_BUDGET // (SMALL - 64) + 10)])
    assert sum(p.base is not None for p in many) >= 9  # past the budget: views again, not copies


def test_safetensors_object_is_a_safetensors_file_of_the_checkpoint(ray_local, llama_dir):
    """The stored blob is read by safetensors itself: every checkpoint tensor byte for byte (plus the
    transport's padding entries, which align each tensor to 64 bytes)."""
    from safetensors.torch import load

    from ray_zerocopy.plugins import get_backend

    tensors = load_file(os.path.join(llama_dir, sorted(f for f in os.listdir(llama_dir) if f.endswith(".safetensors"))[0]))
    payload = get_backend("safetensors").put(tensors)
    read = load(bytes(ray.get(payload.ref)))
    assert {k for k in read if not k.startswith("__ray_zerocopy_pad__.")} == set(tensors)
    assert all(torch.equal(read[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) for k, t in tensors.items())
