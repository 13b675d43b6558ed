"""The models and the loading approaches the benchmark compares (see :mod:`ray_zerocopy.bench.cli`).

Every approach is two plain functions: ``prepare`` runs once in the driver and returns a
small handle (ObjectRefs nested inside it are not resolved by Ray when the handle is passed
to an actor method inside a list), ``load`` runs in an actor and returns a usable model.
The alternatives are written here from their public descriptions, the way a user would:
plain ``ray.put(model)``, Ray's ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` flag (same code as
``ray.put``, run by a driver started with the flag), the classic numpy recipe of the earlier
loaders, and state-dict files read from disk in each actor.
"""

from __future__ import annotations

import contextlib
import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import ray
import torch

from ray_zerocopy._tensors import view_key
from ray_zerocopy.backend import dtype_from_name

# ---------------------------------------------------------------- models

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


# ---------------------------------------------------------------- state-dict files


def all_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name, non-persistent buffers included
    (a state dict drops those, and a meta skeleton would keep them on meta)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: t.detach() for name, t in named}


def dedupe_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(first name -> contiguous tensor, alias -> first name): what a format without sharing can store
    (a quantized tensor: the plain tensors it is stored as)."""
    from ray_zerocopy._tensors import flat_tensors
    from ray_zerocopy.plugins import tensor_adapters

    adapters = tensor_adapters()
    first: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    flat = [pair for outer, tensor in all_tensors(model).items() for pair in flat_tensors(outer, tensor, adapters)]
    for name, t in flat:
        key = view_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            unique[name] = t.contiguous()
    return unique, aliases


def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Put ``tensors`` into a (meta) skeleton by dotted name; tensors viewing the same bytes become
    one object again, so tied weights stay tied. Raises ``KeyError`` naming a missing tensor."""
    made: dict[tuple, Any] = {}  # tie key -> the Parameter or buffer put in the model
    named = [(n, True) for n, _ in model.named_parameters(remove_duplicate=False)]
    named += [(n, False) for n, _ in model.named_buffers(remove_duplicate=False)]
    for name, is_param in named:
        t = tensors[aliases.get(name, name)]
        key = (*view_key(t), is_param)
        if key not in made:
            made[key] = torch.nn.Parameter(t, requires_grad=False) if is_param else t
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        (module._parameters if is_param else module._buffers)[leaf] = made[key]


def load_torch_file(spec: ModelSpec, path: str, mmap: bool) -> torch.nn.Module:
    """Meta skeleton + ``torch.load`` of the tensors file (weights only) + assign."""
    model = build_model(spec, meta=True)
    assign_tensors(model, torch.load(path, mmap=mmap, weights_only=True), {})
    return model


# ---------------------------------------------------------------- approaches


@dataclass
class Prepared:
    """What an approach's ``prepare`` returns: the handle actors get, and every ObjectRef it made."""

    handle: Any
    refs: list[ray.ObjectRef] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _moved(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model.to(device)`` where it moves something: on the CPU that walk alone costs milliseconds,
    which the alternatives' users would not pay (they call it for a GPU only)."""
    return model if device == "cpu" else model.to(device)


OURS_OPTIONS: dict[str, Any] = {}  # keyword arguments of our prepare calls (bench --gpu-copiers)


def _prepare_ours(backend: str) -> Callable[[torch.nn.Module, str], Prepared]:
    def prepare(model: torch.nn.Module, workdir: str) -> Prepared:
        from ray_zerocopy.prepare import prepare_model_for_actors

        model_ref = prepare_model_for_actors(model, backend=backend, **OURS_OPTIONS)
        # actors get the small ModelRef itself, as Ray Data's fn_constructor_kwargs deliver it (and as
        # users hold it); the other approaches get what their users hold: an ObjectRef to the data
        return Prepared(model_ref, list(model_ref.object_refs))

    return prepare


CHECKPOINT: dict[str, str] = {}  # "path": the bench model saved with save_pretrained (bench --checkpoint)
CKPT_PREFIX = "rzc-ckpt:"


def _prepare_ours_checkpoint(backend: str) -> Callable[[torch.nn.Module, str], Prepared]:
    """Ours from the checkpoint folder: a meta skeleton built from its config (timed too), no model in the driver."""
    def prepare(model: torch.nn.Module, workdir: str) -> Prepared:
        from ray_zerocopy.hf import prepare_pretrained

        model_ref = prepare_pretrained(CHECKPOINT["path"], backend=backend, progress=False, **OURS_OPTIONS)
        return Prepared(model_ref, list(model_ref.object_refs))

    return prepare


def _prepare_from_pretrained_put(model: torch.nn.Module, workdir: str) -> Prepared:
    """What users do without us: from_pretrained in the driver, then ray.put of the model."""
    loaded = cast(Any, type(model)).from_pretrained(  # (a transformers model)
        CHECKPOINT["path"], dtype=next(model.parameters()).dtype).eval()
    ref = ray.put(loaded)
    return Prepared(ref, [ref])


def _load_ours(handle: Any, spec: ModelSpec, device: str, share_gpu: bool = False) -> torch.nn.Module:
    from ray_zerocopy.load import load_model_in_actor

    return load_model_in_actor(handle, device=None if device == "cpu" else device, share_gpu=share_gpu)


def _prepare_ray_put(model: torch.nn.Module, workdir: str) -> Prepared:
    ref = ray.put(model)
    return Prepared(ref, [ref])


def _load_ray_put(handle: ray.ObjectRef, spec: ModelSpec, device: str) -> torch.nn.Module:
    return _moved(ray.get(handle), device)


def _prepare_classic(model: torch.nn.Module, workdir: str) -> Prepared:
    """Per-module dicts of numpy arrays (each tensor cloned) + a deep copy with the tensors set to None."""
    tensors = []
    for _, module in model.named_modules():
        params = {n: p.detach().clone().numpy() for n, p in module.named_parameters(recurse=False)}
        buffers = {n: b.detach().clone().numpy() for n, b in module.named_buffers(recurse=False)}
        tensors.append({"params": params, "buffers": buffers})
    skeleton = copy.deepcopy(model)
    for _, module in skeleton.named_modules():
        for name in [*module._parameters, *module._buffers]:
            setattr(module, name, None)
    ref = ray.put((skeleton, tensors))
    return Prepared(ref, [ref])


def _load_classic(handle: ray.ObjectRef, spec: ModelSpec, device: str) -> torch.nn.Module:
    skeleton, tensors = ray.get(handle)
    for (_, module), entry in zip(skeleton.named_modules(), tensors):
        for name, array in entry["params"].items():
            module.register_parameter(name, torch.nn.Parameter(torch.as_tensor(array), requires_grad=False))
        for name, array in entry["buffers"].items():
            module.register_buffer(name, torch.as_tensor(array))
    return _moved(skeleton, device)


def _prepare_torch_file(model: torch.nn.Module, workdir: str) -> Prepared:
    path = os.path.join(workdir, "model.pt")
    torch.save(all_tensors(model), path)
    return Prepared(path, files=[path])


def _load_torch(handle: str, spec: ModelSpec, device: str) -> torch.nn.Module:
    return _moved(load_torch_file(spec, handle, mmap=False), device)


def _load_torch_mmap(handle: str, spec: ModelSpec, device: str) -> torch.nn.Module:
    return _moved(load_torch_file(spec, handle, mmap=True), device)


def _prepare_safetensors(model: torch.nn.Module, workdir: str) -> Prepared:
    from safetensors.torch import save_file

    path = os.path.join(workdir, "model.safetensors")
    unique, aliases = dedupe_tensors(model)  # save_file refuses shared tensors: store ties once
    save_file(unique, path)
    return Prepared((path, aliases), files=[path])


def _load_safetensors(handle: tuple[str, dict[str, str]], spec: ModelSpec, device: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    path, aliases = handle
    model = build_model(spec, meta=True)
    assign_tensors(model, load_file(path), aliases)
    return _moved(model, device)


@dataclass(frozen=True)
class Approach:
    """One way to get the model into N actors."""

    name: str
    kind: str  # "ours", "ray", "classic" or "disk"
    about: str
    prepare: Callable[[torch.nn.Module, str], Prepared]
    load: Callable[[Any, ModelSpec, str], torch.nn.Module]
    copies: bool  # each actor holds a private copy (sizes the memory check before running it)


NATIVE = "ray_native"  # run by a second driver with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1
OTHERS: dict[str, Approach] = {a.name: a for a in [
    Approach("classic", "classic", "numpy dicts per module + deep-copied skeleton, torch.as_tensor on load",
             _prepare_classic, _load_classic, False),
    Approach(NATIVE, "ray", "ray.put(model) with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (driver and workers)",
             _prepare_ray_put, _load_ray_put, False),
    Approach("ray_put", "ray", "plain ray.put(model), ray.get in each actor",
             _prepare_ray_put, _load_ray_put, True),
    Approach("from_pretrained_put", "ray", "from_pretrained(checkpoint folder) in the driver, then ray.put(model) "
             "(needs --checkpoint)", _prepare_from_pretrained_put, _load_ray_put, True),
    Approach("torch_load", "disk", "torch.load of a state-dict file into a meta skeleton",
             _prepare_torch_file, _load_torch, True),
    Approach("torch_load_mmap", "disk", "torch.load(mmap=True) of a state-dict file into a meta skeleton",
             _prepare_torch_file, _load_torch_mmap, False),
    Approach("safetensors_load_file", "disk", "safetensors.torch.load_file into a meta skeleton",
             _prepare_safetensors, _load_safetensors, True),
]}
OURS_PREFIX = "rzc:"


def get_approach(name: str) -> Approach:
    """The approach called ``name``: ``rzc:<backend>`` for each transport of ours, or one of ``OTHERS``."""
    if name.startswith(OURS_PREFIX):
        backend = name[len(OURS_PREFIX):]
        return Approach(name, "ours", f"ray_zerocopy, backend {backend!r}", _prepare_ours(backend), _load_ours, False)
    if name.startswith(CKPT_PREFIX):
        backend = name[len(CKPT_PREFIX):]
        return Approach(name, "ours", f"ray_zerocopy from the checkpoint folder, backend {backend!r}",
                        _prepare_ours_checkpoint(backend), _load_ours, False)
    return OTHERS[name]
