"""Ray Serve: one shared base model per node, a small LoRA adapter per deployment's replicas.

Runs as is (it starts a local Ray and Serve):  python examples/serve_lora_adapters.py [--small]
The driver prepares the base model once; two deployments ("support" and "legal") bind the same ModelRef
and a different PEFT adapter folder. Every replica loads the base zero-copy (``load_model_in_actor``) and
wraps it with its adapter (``PeftModel.from_pretrained``): LoRA adds its small matrices beside the base
layers and never writes the base weights, so all replicas on a node keep sharing one copy of them. Each
answer is checked against the driver's own base + adapter.
"""

from __future__ import annotations

import argparse
import tempfile

import ray
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from ray import serve
from transformers import LlamaConfig, LlamaForCausalLM

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors

IDS = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(1))


def base_model(small: bool) -> LlamaForCausalLM:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if small else dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1024, num_attention_heads=8, num_key_value_heads=4, **size)).eval()


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Adapted:
    """A replica: the node's shared base, plus this deployment's adapter."""

    def __init__(self, base_ref, adapter_dir: str) -> None:
        self.model = PeftModel.from_pretrained(load_model_in_actor(base_ref), adapter_dir).eval()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids).logits

    def base_weights_shared(self) -> bool:
        """Every base weight still a view of the node's object store (none copied into this replica)."""
        from ray_zerocopy.testing import tensors_outside_shared_memory

        return not [k for k in tensors_outside_shared_memory(self.model) if "lora_" not in k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny model (seconds)")
    args = parser.parse_args()

    folder, expected = tempfile.mkdtemp(prefix="rzc-adapters-"), {}
    for i, name in enumerate(["support", "legal"]):  # two fine-tunes of one base (random LoRA weights here)
        base = base_model(args.small)
        torch.manual_seed(100 + i)
        lora = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora.save_pretrained(f"{folder}/{name}")
        with torch.no_grad():
            expected[name] = lora.eval()(IDS).logits

    ray.init(num_cpus=8, include_dashboard=False)
    try:
        base_ref = prepare_model_for_actors(base_model(args.small))  # the base, once per node
        handles = {name: serve.run(Adapted.bind(base_ref, f"{folder}/{name}"), name=name, route_prefix=f"/{name}")
                   for name in expected}
        ok = True
        for name, handle in handles.items():
            got = handle.logits.remote(IDS).result()
            shared = handle.base_weights_shared.remote().result()
            same = torch.equal(got, expected[name])
            ok &= same and shared
            print(f"[{name}] 2 replicas: logits equal to the driver's base + adapter: {same}; "
                  f"base weights shared (zero-copy): {shared} -> {'OK' if same and shared else 'MISMATCH'}")
        serve.shutdown()
        if not ok:
            raise SystemExit(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
