"""Hugging Face shortcut: prepare a saved model folder without building the model in the driver.

``prepare_pretrained(folder)`` builds the model's skeleton from its ``config.json`` with
``accelerate.init_empty_weights()`` (parameters on the meta device, buffers real, ties tied) and
prepares it from the folder's safetensors files: the driver never holds the weights.
A folder saved from a bitsandbytes (4-bit, 8-bit) or torchao model gets the skeleton ``from_pretrained`` would
build (the library's modules, each quantized weight of the library's tensor type over meta inner tensors), and
the quantized bytes go from the files into the object store like any others.
Needs ``transformers`` and ``accelerate`` (imported only here).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open

from ray_zerocopy.backend import dtype_from_name
from ray_zerocopy.checkpoint import checkpoint_files, open_file, read_specs
from ray_zerocopy.errors import CheckpointError, CheckpointMismatchError
from ray_zerocopy.model_ref import ModelRef
from ray_zerocopy.plugins import DEFAULT_BACKEND
from ray_zerocopy.prepare import prepare_model_for_actors


def build_skeleton(path: str | os.PathLike, model_class: Any = None, *, dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a Hugging Face folder with its parameters on the meta device (no weight is read).

    Args:
        path: a folder holding ``config.json`` (what ``save_pretrained`` writes).
        model_class: a transformers model class or Auto class (``AutoModelForCausalLM``, ``LlamaForCausalLM``);
            default: the class the config names in ``architectures`` (the one that saved it).
        dtype: the parameters' dtype; default: the config's (``dtype`` / ``torch_dtype``), else float32.
        trust_remote_code: passed to ``AutoConfig.from_pretrained``.

    Returns:
        The skeleton in eval mode, tied weights tied, buffers (rotary tables, position ids) real. For a folder
        saved from a quantized model (``quantization_config`` with ``quant_method`` ``bitsandbytes`` or
        ``torchao``), its quantized weights are the library's tensor types over meta tensors; their settings
        (a few bytes each) and the files' headers are read here, no weight.

    Raises:
        ImportError: transformers or accelerate (or the folder's quantization library) is not installed.
        CheckpointError: no ``model_class`` given and the config names no architecture transformers has; or the
            folder is quantized by another method (load it with ``from_pretrained`` and prepare the loaded model).
        CheckpointMismatchError: a quantized weight's tensors or settings are missing from the files.

    Example:
        >>> skeleton = build_skeleton("llama/", AutoModelForCausalLM)  # doctest: +SKIP
    """
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_class = model_class or _class_of(config, path)
    quantizer = _quantizer(config, path)
    dtype = dtype or _config_dtype(config)
    if quantizer is not None:
        dtype = quantizer.update_dtype(dtype)
    with init_empty_weights():
        if hasattr(model_class, "from_config"):  # an Auto class
            model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = model_class._from_config(config, dtype=dtype)
        if quantizer is not None:  # (what from_pretrained does: swap in the library's modules, on meta)
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"},
                                       checkpoint_files=list(checkpoint_files(path)))
    if quantizer is not None:
        _quantized_weights(model, path, quantizer.quantization_config.quant_method == "torchao")
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.tie_weights()  # transformers ties at load time; save_pretrained stored the tied weight once
    return model.eval()


Meta = Callable[[str], torch.Tensor]  # checkpoint tensor name -> a meta tensor of its dtype and shape
REBUILT = ("bitsandbytes", "torchao")  # the quant_method values of the folders whose quantized weights we rebuild


def _quantizer(config: Any, path: str | os.PathLike) -> Any:
    """The transformers quantizer of a folder saved from a quantized model (``None`` for a plain one)."""
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return None
    method = settings.get("quant_method") if isinstance(settings, dict) else getattr(settings, "quant_method", None)
    method = getattr(method, "value", method)  # (a QuantizationMethod enum, or its string)
    if method not in REBUILT:
        raise CheckpointError(
            path, f"was saved from a model quantized with quant_method={method!r}, whose saved weights the "
            f"checkpoint route does not rebuild (it rebuilds {' and '.join(REBUILT)} folders)",
            "load the model in the driver (from_pretrained(path, device_map='cpu')) and prepare that: "
            "prepare_model_for_actors(model) shares its quantized weights at their quantized size")
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(settings, pre_quantized=True)
    quantizer.validate_environment(device_map={"": "cpu"}, weights_only=True)
    return quantizer


def _quantized_weights(model: torch.nn.Module, path: str | os.PathLike, torchao: bool) -> None:
    """Make each quantized weight of the skeleton what ``from_pretrained`` makes it (the library's tensor type),
    over meta inner tensors shaped as the checkpoint's, which ``prepare`` then fills from the files like any meta
    weight. Only headers and settings are read here: torchao's metadata, bitsandbytes' packed ``quant_state``
    (a few bytes per weight)."""
    specs = read_specs(path)

    def meta(name: str) -> torch.Tensor:
        if name not in specs:
            raise CheckpointMismatchError(path, [name], [], [])
        dtype, shape = specs[name]
        return torch.empty(shape, dtype=dtype_from_name(dtype), device="meta")

    if torchao:
        _torchao_weights(model, path, specs, meta)
    else:
        _bitsandbytes_weights(model, path, meta)


def _bitsandbytes_weights(model: torch.nn.Module, path: str | os.PathLike, meta: Meta) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.utils import unpack_tensor_to_dict

    settings = {}  # weight name -> its packed quant_state settings (quant_type, blocksize, shape, ...)
    for file in checkpoint_files(path):
        for name, t in open_file(file).items():
            owner, sep, _ = name.partition(".quant_state.bitsandbytes__")
            if sep:
                settings[owner] = unpack_tensor_to_dict(t)
    for prefix, module in model.named_modules():
        name = f"{prefix}.weight"
        if isinstance(module, bnb.nn.Linear4bit):
            if name not in settings:
                raise CheckpointMismatchError(path, [f"{name}.quant_state.bitsandbytes__*"], [], [])
            nested = ("nested_absmax", "nested_quant_map") if "nested_offset" in settings[name] else ()
            stats = {key: meta(f"{name}.{key}") for key in ("absmax", "quant_map", *nested)}
            weight = bnb.nn.Params4bit.from_prequantized(meta(name), {**stats, **settings[name]}, requires_grad=False,
                                                         device="meta", module=module)
            if weight.quant_state.nested:  # (a number in the settings: a real scalar, as from_pretrained makes it)
                weight.quant_state.offset = torch.tensor(float(settings[name]["nested_offset"]))
            module.weight = weight
        elif isinstance(module, bnb.nn.Linear8bitLt):
            data = meta(name)
            module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data,
                                              SCB=meta(f"{prefix}.SCB"))


def _torchao_weights(model: torch.nn.Module, path: str | os.PathLike, saved: Iterable[str], meta: Meta) -> None:
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    metadata: dict[str, str] = {}
    listed: list[str] = []
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            found = f.metadata() or {}
        listed += json.loads(found.get("tensor_names", "[]"))
        metadata.update(found)
    if not listed:
        raise CheckpointError(path, "has a torchao quantization_config but its safetensors files carry no torchao "
                              "metadata (tensor_names)", "save it with save_pretrained from transformers with torchao "
                              "installed, or load it in the driver and prepare the loaded model")
    metadata["tensor_names"] = json.dumps(list(dict.fromkeys(listed)))  # (each shard may list them all)
    for name, t in unflatten_tensor_state_dict({n: meta(n) for n in saved}, metadata)[0].items():
        if type(t) is not torch.Tensor:  # a quantized weight (plain ones the checkpoint fills as they are)
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(t, requires_grad=False))


def _class_of(config: Any, path: str | os.PathLike) -> Any:
    import transformers

    names = getattr(config, "architectures", None) or []
    found = [getattr(transformers, n) for n in names if hasattr(transformers, n)]
    if not found:
        raise CheckpointError(path, f"config.architectures={names!r} names no class of transformers "
                              f"{transformers.__version__}", "pass model_class= (e.g. AutoModelForCausalLM)")
    return found[0]


def _config_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        try:
            dtype = dtype_from_name(dtype)
        except ValueError:  # ("auto", or a name this torch lacks)
            dtype = None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def prepare_pretrained(
    path: str | os.PathLike,
    model_class: Any = None,
    *,
    backend: str = DEFAULT_BACKEND,
    dtype: torch.dtype | None = None,
    node: str | None = None,
    progress: bool | None = None,
    trust_remote_code: bool = False,
    gpu_copiers: bool = False,
    like: ModelRef | None = None,
) -> ModelRef:
    """``prepare_model_for_actors`` for a Hugging Face folder: skeleton from the config, weights from the files.

    Args:
        path: the folder (``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``).
        model_class, dtype, trust_remote_code: as for :func:`build_skeleton`.
        backend, node, progress, gpu_copiers, like: as for :func:`~ray_zerocopy.prepare.prepare_model_for_actors` (with ``node``,
            the owner on that node reads the weights; the config, and a quantized folder's headers, are read here).

    Returns:
        The :class:`~ray_zerocopy.model_ref.ModelRef`, as from ``prepare_model_for_actors``.

    Raises:
        CheckpointError, CheckpointMismatchError, PrepareNodeError: as ``prepare_model_for_actors``, and as
            :func:`build_skeleton` (a folder quantized by a method other than bitsandbytes or torchao).
        ImportError: transformers or accelerate is not installed.

    Example:
        >>> ref = prepare_pretrained("/models/llama-3-8b", AutoModelForCausalLM, backend="packed")  # doctest: +SKIP
        >>> model = load_model_in_actor(ref)  # in each actor  # doctest: +SKIP
    """
    skeleton = build_skeleton(path, model_class, dtype=dtype, trust_remote_code=trust_remote_code)
    return prepare_model_for_actors(skeleton, backend, checkpoint=path, node=node, progress=progress,
                                    gpu_copiers=gpu_copiers, like=like)
