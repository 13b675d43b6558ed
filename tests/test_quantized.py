"""Quantized models travel at their quantized size and come back bit-identical: torchao, optimum-quanto and
bitsandbytes tensors (directly and through transformers' quantization configs), through every backend.

Each recipe quantizes the same small Llama (built from a config) with the library's own API; the actor's
logits must equal the driver's bit for bit, the weights must keep their quantized types, and on the CPU
every stored tensor (the quantized data and its scales) must be a view of the node's shared memory.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import pytest
import ray
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, QuantoConfig, TorchAoConfig

from ray_zerocopy import AdaptedDtypeError, UnsupportedModelError, load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.testing import tensors_outside_shared_memory

warnings.filterwarnings("ignore", module="torchao|bitsandbytes|optimum")

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@functools.cache
def _folder() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="rzc-llama-")
    _llama().save_pretrained(path)
    return path


def _torchao(config_name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchao.quantization as q

        model = _llama()
        q.quantize_(model, getattr(q, config_name)(**kwargs))
        return model
    return build


def _quanto(qtype: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import optimum.quanto as oq

        model = _llama()
        oq.quantize(model, weights=getattr(oq, qtype))
        oq.freeze(model)
        return model
    return build


def _pretrained(make_config: Callable[[], object]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(_folder(), quantization_config=make_config(), device_map="cpu",
                                                dtype=torch.float32).eval()
    return build


def _bnb4(quant_type: str) -> Callable[[], object]:
    return lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)


RECIPES: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {  # name: (build, the q_proj weight's type)
    "torchao-int8-weight-only": (_torchao("Int8WeightOnlyConfig"), "Int8Tensor"),
    "torchao-int8-dynamic": (_torchao("Int8DynamicActivationInt8WeightConfig"), "Int8Tensor"),
    "torchao-intx-int4": (_torchao("IntxWeightOnlyConfig", weight_dtype=torch.int4), "IntxUnpackedToInt8Tensor"),
    "quanto-qint8": (_quanto("qint8"), "WeightQBytesTensor"),
    "quanto-qint4": (_quanto("qint4"), "WeightQBitsTensor"),  # nests a PackedTensor
    "hf-bnb-8bit": (_pretrained(lambda: BitsAndBytesConfig(load_in_8bit=True)), "Int8Params"),
    "hf-bnb-nf4": (_pretrained(_bnb4("nf4")), "Params4bit"),
    "hf-bnb-fp4": (_pretrained(_bnb4("fp4")), "Params4bit"),
    "hf-torchao": (_pretrained(lambda: TorchAoConfig(__import__("torchao.quantization").quantization.Int8WeightOnlyConfig())),
                   "Int8Tensor"),
    "hf-quanto": (_pretrained(lambda: QuantoConfig(weights="int4")), "WeightQBitsTensor"),
}
# one per library in the default tier; the rest, and the other backends, in the slow tier
DEFAULT_TIER = {"torchao-int8-weight-only", "quanto-qint4", "hf-bnb-nf4", "hf-bnb-8bit"}


@functools.cache
def _built(recipe: str) -> tuple[torch.nn.Module, torch.Tensor]:
    model = RECIPES[recipe][0]()
    with torch.no_grad():
        return model, model(IDS).logits


def _q_proj(model: torch.nn.Module) -> torch.Tensor:
    return model.model.layers[0].self_attn.q_proj.weight


@ray.remote(num_cpus=0.5)
def _load_and_run(ref, ids: torch.Tensor, **options) -> tuple[torch.Tensor, str, list[str]]:
    model = load_model_in_actor(ref, **options)
    with torch.no_grad():
        logits = model(ids).logits
    return logits, type(_q_proj(model)).__name__, tensors_outside_shared_memory(model)


@pytest.mark.other_backends_slow
@pytest.mark.parametrize("recipe", [r if r in DEFAULT_TIER else pytest.param(r, marks=pytest.mark.slow) for r in RECIPES])
def test_quantized_model_is_shared_and_bit_identical(ray_local, backend, recipe):
    model, expected = _built(recipe)
    ref = prepare_model_for_actors(model, backend=backend)
    dense = sum(p.numel() * 4 for p in _llama().parameters())
    assert ref.nbytes < 0.6 * dense, f"stored {ref.nbytes} bytes for a {dense}-byte fp32 model: not at quantized size"
    logits, kind, outside = ray.get(_load_and_run.remote(ref, IDS))
    assert kind == RECIPES[recipe][1]
    assert torch.equal(logits, expected)
    if backend != "fake_per_tensor":  # (the fake transport copies on purpose: it claims no zero copy)
        assert outside == [], f"not views of the object store: {outside}"


def test_private_copy_and_copy_on_write(ray_local):
    """A write into one actor's quantized data stays in that actor (copy-on-write); private_copy loads too."""
    model, expected = _built("torchao-int8-weight-only")
    ref = prepare_model_for_actors(model)

    @ray.remote(num_cpus=0.5)
    def write_then_run(ref, ids):
        loaded = load_model_in_actor(ref)
        with torch.no_grad():
            _q_proj(loaded).qdata.fill_(1)  # into the shared bytes' private copy-on-write pages
            return loaded(ids).logits

    written = ray.get(write_then_run.remote(ref, IDS))
    assert not torch.equal(written, expected)
    assert torch.equal(ray.get(_load_and_run.remote(ref, IDS))[0], expected)
    logits, _, outside = ray.get(_load_and_run.remote(ref, IDS, private_copy=True))
    assert torch.equal(logits, expected) and outside


def test_dtype_is_refused_naming_the_quantized_tensor(ray_local):
    ref = prepare_model_for_actors(_built("quanto-qint8")[0])
    with pytest.raises(AdaptedDtypeError, match=r"dtype=torch.float16 cannot convert tensor 'model\..*'.*WeightQBytesTensor"):
        ray.get(_load_and_run.remote(ref, IDS, dtype=torch.float16))


class Opaque(torch.Tensor):
    """A tensor subclass that implements no flatten protocol and that no adapter knows."""


def test_unknown_tensor_type_is_refused_with_the_real_options(ray_local):
    model = torch.nn.Linear(4, 4)
    model.weight = torch.nn.Parameter(model.weight.detach().as_subclass(Opaque), requires_grad=False)
    with pytest.raises(UnsupportedModelError) as info:
        prepare_model_for_actors(model)
    message = str(info.value)
    assert "'weight'" in message and "Opaque" in message and "TensorAdapter" in message
    assert "dequantize" not in message and "private_copy=True does not help" in message
