"""The models the benchmark runs (see :mod:`ray_zerocopy.bench.cli`): transformers BERT and GPT-2 built from
configs (presets, or sizes given on the command line), random weights filled in parallel, optionally
quantized with torchao, optimum-quanto or bitsandbytes; the input every approach runs on."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ray_zerocopy.backend import dtype_from_name

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-bert": ("bert", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64)),
    "tiny-gpt2": ("gpt2", dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    "bert-base": ("bert", {}),  # 110 M parameters, 438 MB in float32
    "bert-large": ("bert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096)),
    "gpt2-small": ("gpt2", {}),  # 124 M parameters (lm_head tied to wte)
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),  # 1.42 GB
    "gpt2-1.7gb": ("gpt2", dict(n_embd=1024, n_layer=30, n_head=16)),  # 430 M parameters, 1.72 GB
    "gpt2-large": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20)),  # 3.1 GB
}


@dataclass(frozen=True)
class ModelSpec:
    """Enough to rebuild the model's structure anywhere (an actor builds it on the meta device)."""

    name: str
    family: str  # "bert" or "gpt2"
    config: dict[str, Any] = field(default_factory=dict)  # transformers config overrides
    dtype: str = "float32"
    quantize: str = "none"  # one of QUANTIZE: how build_model quantizes the model's linear layers


QUANTIZE = ("none", "torchao-int8", "torchao-int8-dynamic", "quanto-int8", "bnb-nf4", "bnb-int8")


def make_spec(preset: str, dtype: str, layers: int | None = None, hidden: int | None = None,
              quantize: str = "none") -> ModelSpec:
    """A :class:`ModelSpec` from a preset name and optional size overrides (heads = hidden / 64).

    Raises:
        ValueError: unknown preset or dtype, or a hidden size that is not a positive multiple of 64.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}; expected one of {', '.join(PRESETS)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16")
    family, config = PRESETS[preset]
    config = dict(config)
    bert = family == "bert"
    name = preset
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        config["num_hidden_layers" if bert else "n_layer"] = layers
        name += f"-L{layers}"
    if hidden is not None:
        if hidden < 64 or hidden % 64:
            raise ValueError(f"--hidden must be a positive multiple of 64 (heads of 64), got {hidden}")
        heads = hidden // 64
        config.update(dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden)
                      if bert else dict(n_embd=hidden, n_head=heads))
        name += f"-H{hidden}"
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown --quantize {quantize!r}; expected one of {', '.join(QUANTIZE)}")
    if quantize != "none":
        name += f"-{quantize}"
    return ModelSpec(name, family, config, dtype, quantize)


def _model_class(spec: ModelSpec) -> tuple[Any, Any]:  # (a transformers model class, its config)
    if spec.family == "bert":
        from transformers import BertConfig, BertModel

        return BertModel, BertConfig(**spec.config)
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(**{"bos_token_id": 0, "eos_token_id": 0, **spec.config})


def build_model(spec: ModelSpec, meta: bool = False) -> torch.nn.Module:
    """The model in eval mode with ``requires_grad=False``: random weights (seed 0), or on the meta device.

    Random init is our own single pass of ``normal_``, one generator per tensor (seeded by its index) and
    tensors filled in parallel (Hugging Face's init is 3x slower on big models, one generator 10x on 16 cores).
    """
    cls, config = _model_class(spec)
    if meta:
        with torch.device("meta"):
            model = cls(config)
    else:
        no_init: Callable[[], contextlib.AbstractContextManager[Any]]
        try:
            from transformers.initialization import no_init_weights as no_init
        except ImportError:  # older transformers: pay for its init, then overwrite it
            no_init = contextlib.nullcontext
        with no_init():
            model = cls(config)
        model.tie_weights()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_fill, enumerate(model.named_parameters())))
    model = model.to(dtype_from_name(spec.dtype)).eval().requires_grad_(False)
    return model if meta or spec.quantize == "none" else quantize_model(model, spec.quantize)


QUANTIZER_MODULES = {"torchao": "torchao.quantization", "quanto": "optimum.quanto", "bnb": "bitsandbytes"}


def quantizer_module(how: str) -> str | None:
    """The library module a ``--quantize`` model needs imported (every approach's actors import it first)."""
    return None if how == "none" else QUANTIZER_MODULES[how.split("-")[0]]


def quantize_model(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """Quantize the model's linear layers in place with the library's own API (deterministic: the same model
    gives the same bytes). GPT-2's attention and MLP are Conv1D, not Linear: quantize a BERT."""
    if how.startswith("torchao"):
        import torchao.quantization as q

        config = q.Int8WeightOnlyConfig() if how == "torchao-int8" else q.Int8DynamicActivationInt8WeightConfig()
        q.quantize_(model, config)
    elif how == "quanto-int8":
        import optimum.quanto as oq

        oq.quantize(model, weights=oq.qint8)
        oq.freeze(model)
    else:  # bitsandbytes: what transformers' BitsAndBytesConfig does to each Linear (lm_head kept, as it does)
        import bitsandbytes as bnb

        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear or child_name == "lm_head":
                    continue
                args = (child.in_features, child.out_features, child.bias is not None)
                new = (bnb.nn.Linear4bit(*args, compute_dtype=child.weight.dtype, quant_type="nf4",
                                         compress_statistics=True) if how == "bnb-nf4"
                       else bnb.nn.Linear8bitLt(*args, has_fp16_weights=False))
                new.load_state_dict(child.state_dict())
                setattr(parent, child_name, new.to("cpu").eval().requires_grad_(False))  # (.to quantizes)
    return model


def _fill(item: tuple[int, tuple[str, torch.Tensor]]) -> None:
    index, (name, p) = item
    with torch.no_grad():  # (grad mode is per thread)
        if p.dim() > 1:
            p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(index))
        else:  # norms' weights 1, biases 0: keeps activations in a sane range
            p.fill_(1.0 if name.endswith("weight") else 0.0)


def sample_input(spec: ModelSpec) -> torch.Tensor:
    """The token ids every approach's model is run on (1 x 16)."""
    vocab = spec.config.get("vocab_size", 30522 if spec.family == "bert" else 50257)
    return torch.randint(0, min(vocab, 1000), (1, 16), generator=torch.Generator().manual_seed(1))


def run_model(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One forward pass; the output tensor (logits or last hidden state) as float32 on the CPU."""
    with torch.no_grad():
        out = model(input_ids=ids.to(next(model.parameters()).device))
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out.float().cpu()
