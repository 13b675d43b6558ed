"""Quantized models on a GPU: bitsandbytes 4-bit and 8-bit, torchao and optimum-quanto quantized on CUDA in the
driver, loaded onto the actor's GPU (private copy, share_gpu, live update), bit-identical to the driver's.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine with a real Ray.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import ray
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors, update_model_in_actor
from ray_zerocopy.plugins import tensor_adapters

warnings.filterwarnings("ignore", module="torchao|bitsandbytes|optimum")


def _recipes() -> dict[str, Callable[[float], torch.nn.Module]]:
    from test_quantized import _folder, _llama

    def bnb(config: Callable[[], BitsAndBytesConfig]) -> Callable[[float], torch.nn.Module]:
        def build(scale: float) -> torch.nn.Module:
            model = LlamaForCausalLM.from_pretrained(_folder(), quantization_config=config(), device_map="cuda",
                                                     dtype=torch.float16).eval()
            with torch.no_grad():  # (another version: the norms scaled)
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.mul_(scale)
            return model
        return build

    def torchao_int8(scale: float) -> torch.nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = _llama().to("cuda", torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        quantize_(model, Int8WeightOnlyConfig())
        return model

    def torchao_int4(scale: float) -> torch.nn.Module:
        from test_quantized import IDS
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        model = _llama().to("cuda", torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        try:  # (the issue asks for int4 weight-only "where the platform runs it": its kernels may be absent)
            quantize_(model, Int4WeightOnlyConfig(group_size=32))
            with torch.no_grad():
                model(IDS.cuda())
        except (ImportError, NotImplementedError, RuntimeError) as exc:
            pytest.skip(f"torchao Int4WeightOnlyConfig does not run on this machine: {type(exc).__name__}: {exc}")
        return model

    def quanto_qint4(scale: float) -> torch.nn.Module:
        import optimum.quanto as oq

        model = _llama().to("cuda", torch.float16)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        oq.quantize(model, weights=oq.qint4)
        oq.freeze(model)
        return model

    nf4 = lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # noqa: E731
                                     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)
    return {"bnb-nf4": bnb(nf4), "bnb-8bit": bnb(lambda: BitsAndBytesConfig(load_in_8bit=True)),
            "torchao-int8": torchao_int8, "torchao-int4": torchao_int4, "quanto-qint4": quanto_qint4}


def _inner(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    from ray_zerocopy._tensors import flat_tensors

    adapters = tensor_adapters()
    return [pair for name, p in model.named_parameters() for pair in flat_tensors(name, p, adapters)]


@ray.remote(num_gpus=0.25)  # (three at once on one GPU: the private one and two sharing)
class GpuReplica:
    def __init__(self, ref, **options):
        self.model = load_model_in_actor(ref, device="cuda", **options)

    def run(self, ids):
        with torch.no_grad():
            return self.model(ids.cuda()).logits.cpu()

    def describe(self):
        weight = self.model.model.layers[0].self_attn.q_proj.weight
        return type(weight).__name__, sorted({t.device.type for _, t in _inner(self.model)})

    def pointers(self):
        return {name: t.data_ptr() for name, t in _inner(self.model)}

    def update(self, ref):
        update_model_in_actor(self.model, ref)

    def wait_shared(self):
        from ray_zerocopy.gpu_share import wait_shared

        return wait_shared(self.model, 120)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["bnb-nf4", "bnb-8bit", "torchao-int8", "torchao-int4", "quanto-qint4"])
def test_quantized_on_the_gpu_load_share_and_update(ray_local, recipe):
    from test_quantized import IDS

    build = _recipes()[recipe]
    model = build(1.0)
    with torch.no_grad():
        expected = model(IDS.cuda()).logits.cpu()
    ref = prepare_model_for_actors(model)
    kind = type(model.model.layers[0].self_attn.q_proj.weight).__name__

    private = GpuReplica.remote(ref)
    assert ray.get(private.describe.remote()) == (kind, ["cuda"])
    assert torch.equal(ray.get(private.run.remote(IDS)), expected)

    shared = [GpuReplica.remote(ref, share_gpu=True) for _ in range(2)]
    assert all(ray.get([r.wait_shared.remote() for r in shared]))
    for replica in shared:
        assert torch.equal(ray.get(replica.run.remote(IDS)), expected)

    new = build(1.25)
    with torch.no_grad():
        new_expected = new(IDS.cuda()).logits.cpu()
    assert not torch.equal(new_expected, expected)
    before = ray.get(private.pointers.remote())
    ray.get(private.update.remote(prepare_model_for_actors(new)))
    assert ray.get(private.pointers.remote()) == before  # copied into the same device memory
    assert torch.equal(ray.get(private.run.remote(IDS)), new_expected)
