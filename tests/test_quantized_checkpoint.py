"""The checkpoint route for quantized models: a folder that ``save_pretrained`` wrote from a bitsandbytes or
torchao model is prepared from its files (``prepare_pretrained``, or ``checkpoint=`` with ``build_skeleton``),
without building the model in the driver.

The actor's model must answer bit for bit as ``from_pretrained(folder)`` in the driver, hold the library's
tensor types, and read every weight from the node's shared memory; the driver's skeleton holds no weight data.
A folder quantized by a method the route does not rebuild is refused at prepare time, saying what to do.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, TorchAoConfig

from ray_zerocopy import (
    CheckpointError,
    CheckpointMismatchError,
    load_model_in_actor,
    prepare_model_for_actors,
    update_model_in_actor,
)
from ray_zerocopy.backend import dtype_from_name
from ray_zerocopy.checkpoint import read_specs
from ray_zerocopy.hf import build_skeleton, prepare_pretrained
from ray_zerocopy.plugins import get_backend
from ray_zerocopy.testing import tensors_outside_shared_memory
from ray_zerocopy.testing.proof import unique_tensors

warnings.filterwarnings("ignore", module="torchao|bitsandbytes")

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


@functools.cache
def _dense(tied: bool = False, seed: int = 0) -> str:
    torch.manual_seed(seed)
    path = tempfile.mkdtemp(prefix="rzc-dense-")
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=tied)).eval()
    (model.to(torch.bfloat16) if tied else model).save_pretrained(path)
    return path


def _torchao(config_name: str) -> Callable[[], object]:
    def make() -> object:
        import torchao.quantization as q

        return TorchAoConfig(getattr(q, config_name)())
    return make


def _nf4(**kwargs) -> Callable[[], object]:
    return lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **kwargs)


# name: (quantization config, the q_proj weight's type, save_pretrained options, tied bf16 base)
RECIPES: dict[str, tuple[Callable[[], object], str, dict, bool]] = {
    "bnb-nf4-double": (_nf4(bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32), "Params4bit", {},
                       False),
    "torchao-int8-weight-only": (_torchao("Int8WeightOnlyConfig"), "Int8Tensor", {}, False),
    "bnb-8bit": (lambda: BitsAndBytesConfig(load_in_8bit=True), "Int8Params", {}, False),
    "bnb-fp4-sharded": (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "Params4bit",
                        {"max_shard_size": "100KB"}, False),
    "bnb-nf4-tied-bf16": (_nf4(bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), "Params4bit",
                          {}, True),
    "torchao-int8-dynamic-sharded": (_torchao("Int8DynamicActivationInt8WeightConfig"), "Int8Tensor",
                                     {"max_shard_size": "100KB"}, False),
}
DEFAULT_TIER = {"bnb-nf4-double", "torchao-int8-weight-only"}


@functools.cache
def _saved(recipe: str, seed: int = 0) -> str:
    """A folder that save_pretrained wrote from the model quantized by ``recipe`` (transformers' own API)."""
    make_config, _, options, tied = RECIPES[recipe]
    model = AutoModelForCausalLM.from_pretrained(_dense(tied, seed), quantization_config=make_config(),
                                                 device_map="cpu")
    path = tempfile.mkdtemp(prefix=f"rzc-{recipe}-")
    model.save_pretrained(path, **options)
    return path


def _expected(folder: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    with torch.no_grad():
        return model(IDS).logits


@ray.remote(num_cpus=0.5)
def _load_and_run(ref, ids: torch.Tensor) -> tuple[torch.Tensor, str, list[str] | None, bool]:
    model = load_model_in_actor(ref)
    with torch.no_grad():
        logits = model(ids).logits
    backend = get_backend(ref.backend)  # (a transport that claims no zero copy is not checked for it)
    outside = tensors_outside_shared_memory(model, backend.shared_memory_marker) if backend.zero_copy else None
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return logits, type(model.model.layers[0].self_attn.q_proj.weight).__name__, outside, tied


def _file_bytes(folder: str) -> int:
    return sum(dtype_from_name(d).itemsize * math.prod(shape) for d, shape in read_specs(folder).values())


@pytest.mark.other_backends_slow
@pytest.mark.parametrize("recipe", [r if r in DEFAULT_TIER else pytest.param(r, marks=pytest.mark.slow) for r in RECIPES])
def test_saved_quantized_folder_is_prepared_from_its_files(ray_local, backend, recipe):
    folder = _saved(recipe)
    expected = _expected(folder)
    skeleton = build_skeleton(folder)
    buffers = dict(skeleton.named_buffers())
    # (scalars excepted: bitsandbytes' nested offset is a number of the settings, read from the file)
    held = [n for n, t in unique_tensors(skeleton) if not t.is_meta and n not in buffers and t.dim()]
    assert held == [], f"the driver's skeleton holds weight data: {held}"
    ref = prepare_model_for_actors(skeleton, backend=backend, checkpoint=folder)
    # stored: the checkpoint's tensors at their size (settings excepted) and the buffers it lacks, nothing twice
    assert ref.nbytes <= _file_bytes(folder) + sum(b.nbytes for b in buffers.values())
    logits, kind, outside, tied = ray.get(_load_and_run.remote(ref, IDS))
    assert kind == RECIPES[recipe][1]
    assert torch.equal(logits, expected)
    assert outside in ([], None), f"not views of shared memory: {outside}"
    assert tied == RECIPES[recipe][3]


def test_prepare_pretrained_of_a_quantized_folder(ray_local):
    folder = _saved("bnb-nf4-double")
    logits, kind, outside, _ = ray.get(_load_and_run.remote(prepare_pretrained(folder), IDS))
    assert kind == "Params4bit" and outside == [] and torch.equal(logits, _expected(folder))


@ray.remote(num_cpus=0.5)
def _run_update_run(ref, new_ref, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_model_in_actor(ref)
    with torch.no_grad():
        before = model(ids).logits
        update_model_in_actor(model, new_ref)
        return before, model(ids).logits


def test_a_new_saved_version_updates_a_live_model(ray_local):
    """``like=``: the folder of a new version (other absmax, other nested offsets) moves into a live model."""
    old, new = _saved("bnb-nf4-double"), _saved("bnb-nf4-double", seed=1)
    ref = prepare_pretrained(old)
    before, after = ray.get(_run_update_run.remote(ref, prepare_pretrained(new, like=ref), IDS))
    assert torch.equal(before, _expected(old)) and torch.equal(after, _expected(new))


@pytest.mark.unit
def test_a_quantization_method_the_route_does_not_rebuild_is_refused(tmp_path):
    folder = Path(_dense())
    for file in folder.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quant_method='gptq'.*Fix: load the model in the driver") as info:
        prepare_pretrained(tmp_path)
    assert info.value.path == tmp_path


@pytest.mark.unit
def test_a_quantized_folder_missing_a_statistic_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = Path(_saved("bnb-nf4-double"))
    for file in folder.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as info:
        build_skeleton(tmp_path)
    assert info.value.missing == ["model.layers.1.mlp.up_proj.weight.absmax"]
