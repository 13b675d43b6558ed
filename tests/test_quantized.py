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
from ray_zerocopy.plugins import get_backend
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
DEFAULT_TIER = {"torchao-int8-weight-only", "quanto-qint8", "hf-bnb-nf4", "hf-bnb-8bit"}  # (qint4: 47 s of CPU forward)


@functools.cache
def _built(recipe: str) -> tuple[torch.nn.Module, torch.Tensor]:
    model = RECIPES[recipe][0]()
    with torch.no_grad():
        return model, model(IDS).logits


def _q_proj(model: torch.nn.Module) -> torch.Tensor:
    return model.model.layers[0].self_attn.q_proj.weight


@ray.remote(num_cpus=0.5)
def _load_and_run(ref, ids: torch.Tensor, **options) -> tuple[torch.Tensor, str, list[str] | None]:
    model = load_model_in_actor(ref, **options)
    with torch.no_grad():
        logits = model(ids).logits
    backend = get_backend(ref.backend)  # (a transport that claims no zero copy is not checked for it)
    outside = tensors_outside_shared_memory(model, backend.shared_memory_marker) if backend.zero_copy else None
    return logits, type(_q_proj(model)).__name__, outside


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
    assert outside in ([], None), f"not views of shared memory: {outside}"


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


class Generator:
    """A pipeline object: a quantized model plus plain attributes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.name = "gen"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids).logits


@pytest.mark.parametrize("recipe", ["hf-bnb-nf4", "torchao-int8-dynamic"])
def test_pipelines_and_task_mode(ray_local, recipe):
    from ray_zerocopy import load_pipeline_in_actor, rewrite_pipeline, rewrite_pipeline_for_actors

    model, expected = _built(recipe)
    skeleton, refs = rewrite_pipeline_for_actors(Generator(model))

    @ray.remote(num_cpus=0.5)
    def run(skeleton, refs, ids):
        return load_pipeline_in_actor(skeleton, refs)(ids)

    assert torch.equal(ray.get(run.remote(skeleton, refs, IDS)), expected)
    remote = rewrite_pipeline(Generator(model))  # each model call runs in a Ray task
    assert torch.equal(remote.model(IDS).logits, expected)
    assert remote.model.config.hidden_size == CONFIG.hidden_size  # (from the skeleton, rebuilt on the meta device)


@pytest.mark.slow
def test_peft_lora_unmerged_and_a_shared_base_with_per_actor_adapters(ray_local, tmp_path):
    """One shared base per node, a small LoRA adapter per actor: the base weights stay views of the node's
    shared memory (LoRA never writes them), and each actor answers as its adapter's model in the driver."""
    from peft import LoraConfig, PeftModel, get_peft_model

    adapters = {}
    for i in range(2):
        base = _llama()
        torch.manual_seed(10 + i)
        lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora.save_pretrained(tmp_path / f"adapter{i}")
        with torch.no_grad():
            adapters[i] = lora.eval()(IDS).logits
    assert not torch.equal(adapters[0], adapters[1])

    unmerged = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = unmerged(IDS).logits

    @ray.remote(num_cpus=0.5)
    def run_peft(ref, ids):
        with torch.no_grad():
            return load_model_in_actor(ref)(ids).logits

    assert torch.equal(ray.get(run_peft.remote(prepare_model_for_actors(unmerged), IDS)), expected)

    @ray.remote(num_cpus=0.5)
    class Replica:
        def __init__(self, base_ref, adapter_dir: str) -> None:
            self.model = PeftModel.from_pretrained(load_model_in_actor(base_ref), adapter_dir).eval()

        def run(self, ids):
            with torch.no_grad():
                logits = self.model(ids).logits
            base = {k: v for k, v in self.model.named_parameters() if "lora_" not in k}
            return logits, [k for k, v in base.items() if v.data_ptr() and not _shared(v)]

    base_ref = prepare_model_for_actors(_llama())
    replicas = [Replica.remote(base_ref, str(tmp_path / f"adapter{i}")) for i in range(2)]
    for i, replica in enumerate(replicas):
        logits, private = ray.get(replica.run.remote(IDS))
        assert torch.equal(logits, adapters[i])
        assert private == [], f"base weights copied into the actor: {private}"


def _shared(t: torch.Tensor) -> bool:
    from ray_zerocopy._shm import STORE_MARKER
    from ray_zerocopy.testing import merged_mappings

    return any(lo <= t.data_ptr() < hi for lo, hi in merged_mappings(STORE_MARKER))


@pytest.mark.parametrize("recipe", ["torchao-int8-weight-only", *(
    pytest.param(r, marks=pytest.mark.slow) for r in ("quanto-qint4", "hf-bnb-nf4", "hf-bnb-8bit"))])
def test_update_of_a_quantized_model_in_place(ray_local, recipe):
    """A new quantized version moves into the live model: the same parameter objects, the new outputs."""
    from ray_zerocopy import update_model_in_actor

    old, old_logits = _built(recipe)
    new = RECIPES[recipe][0]()  # the same recipe on other float weights
    with torch.no_grad():
        for p in new.parameters():
            if p.dtype.is_floating_point and type(p) in (torch.Tensor, torch.nn.Parameter):
                p.mul_(1.5)
        new_logits = new(IDS).logits
    assert not torch.equal(new_logits, old_logits)

    @ray.remote(num_cpus=0.5)
    class Live:
        def __init__(self, ref):
            self.model = load_model_in_actor(ref)
            self.ids = [id(p) for p in self.model.parameters()]

        def update(self, ref):
            update_model_in_actor(self.model, ref)
            return [id(p) for p in self.model.parameters()] == self.ids, tensors_outside_shared_memory(self.model)

        def run(self, ids):
            with torch.no_grad():
                return self.model(ids).logits

    live = Live.remote(prepare_model_for_actors(old))
    assert torch.equal(ray.get(live.run.remote(IDS)), old_logits)
    same_objects, outside = ray.get(live.update.remote(prepare_model_for_actors(new)))
    assert same_objects and outside == []
    assert torch.equal(ray.get(live.run.remote(IDS)), new_logits)
