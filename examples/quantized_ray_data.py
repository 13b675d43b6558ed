"""A quantized model in a Ray Data actor pool: 4 actors, one copy of the quantized weights per node.

Runs as is (it starts a local Ray):  python examples/quantized_ray_data.py [--quantize bnb-nf4] [--small]
The driver builds a Llama from a config (random weights: no download), quantizes it with the library's
own API (torchao int8 weight-only by default; bitsandbytes nf4 or optimum-quanto qint8 with --quantize), and
prepares it once. Each actor of the pool rebuilds it from views of the object store: its forward runs the
library's own quantized kernels, and every actor's logits equal the driver's bit for bit.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from transformers import LlamaConfig, LlamaForCausalLM

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors

warnings.filterwarnings("ignore", module="torchao|bitsandbytes|optimum")


def build(small: bool) -> LlamaForCausalLM:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if small else dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1024, num_attention_heads=8, num_key_value_heads=4, **size)).eval()


def quantize(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """Each library's documented call."""
    if how == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    elif how == "quanto-qint8":
        from optimum.quanto import freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        quanto_quantize(model, weights=qint8)
        freeze(model)
    else:  # bnb-nf4: what transformers' BitsAndBytesConfig(load_in_4bit=True) does to each Linear
        import bitsandbytes as bnb

        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and name != "lm_head":
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                            compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                    new.load_state_dict(child.state_dict())
                    setattr(parent, name, new.to("cpu"))  # (.to quantizes)
    return model


class NextToken:
    """A Ray Data UDF: loads the shared quantized model once per actor, predicts the next token of each row."""

    def __init__(self, model_ref):
        self.model = load_model_in_actor(model_ref)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits = self.model(torch.as_tensor(batch["ids"])).logits[:, -1]
        return {"row": batch["row"], "next": logits.argmax(-1).numpy(), "logit": logits.max(-1).values.numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="torchao-int8", choices=["torchao-int8", "bnb-nf4", "quanto-qint8"])
    parser.add_argument("--small", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()

    dense_bytes = sum(p.nbytes for p in build(args.small).parameters())
    model = quantize(build(args.small), args.quantize)
    ids = torch.randint(0, 1024, (args.rows, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits[:, -1]

    ray.init(num_cpus=8, include_dashboard=False)
    try:
        model_ref = prepare_model_for_actors(model)
        print(f"[1] {args.quantize}: {model_ref.nbytes / 1e6:.2f} MB in the object store, once per node "
              f"(the float32 model: {dense_bytes / 1e6:.2f} MB)")
        ds = ray.data.from_items([{"row": i, "ids": ids[i].numpy()} for i in range(args.rows)])
        out = ds.map_batches(NextToken, fn_constructor_kwargs={"model_ref": model_ref}, batch_size=16,
                             compute=ActorPoolStrategy(size=4), num_cpus=1).take_all()
        out.sort(key=lambda r: r["row"])
        same = sum(int(r["next"] == expected[r["row"]].argmax()) and float(r["logit"]) == float(expected[r["row"]].max())
                   for r in out)
        print(f"[2] 4 actors predicted {len(out)} rows; equal to the driver's quantized model: {same}/{args.rows} -> "
              f"{'OK' if same == args.rows else 'MISMATCH'}")
        if same != args.rows:
            raise SystemExit(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
