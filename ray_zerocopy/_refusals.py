"""What cannot be split, refused in the driver with the tensor or submodule named and the fix."""

from __future__ import annotations

from typing import cast

import torch

from ray_zerocopy.errors import UnsupportedModelError

PLAIN = (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor))  # (Buffer: torch 2.5+)


def check_tensor(name: str, t: torch.Tensor, allow_meta: bool = False) -> None:
    """Refuse, in the driver, tensors that cannot be carried as plain bytes (and that no adapter carries)."""
    module = name.rpartition(".")[0]
    if isinstance(t, (torch.nn.parameter.UninitializedParameter, torch.nn.parameter.UninitializedBuffer)):
        raise UnsupportedModelError(
            module, f"tensor {name!r} is a {type(t).__qualname__} (a lazy module that has not run yet)",
            "materialize the model first: run a forward pass with a sample input before preparing",
        )
    if type(t) not in PLAIN:
        raise UnsupportedModelError(
            module, f"tensor {name!r} is a {type(t).__module__}.{type(t).__qualname__}, a tensor type that no installed "
            "tensor adapter carries (it implements neither PyTorch's __tensor_flatten__ protocol nor an adapter's type)",
            "install the package that provides an adapter for this type, or write a ray_zerocopy.TensorAdapter for it "
            "and register it (entry-point group 'ray_zerocopy', hook register_tensor_adapters) where the driver and "
            "the actors run; private_copy=True does not help (the weights are split in the driver)",
        )
    if t.is_quantized or t.is_sparse or t.layout != torch.strided:
        raise UnsupportedModelError(
            module, f"tensor {name!r} has layout {t.layout} / quantized={t.is_quantized}",
            "convert it to a dense strided tensor (e.g. .dequantize() or .to_dense()) before preparing",
        )
    if t.device.type == "meta" and not allow_meta:
        raise UnsupportedModelError(
            module, f"tensor {name!r} is on the meta device and holds no data",
            "load real weights into the model (e.g. load_state_dict(..., assign=True)) before preparing",
        )


def check_module(name: str, module: torch.nn.Module) -> None:
    """Refuse, in the driver, module kinds whose weights would not be shared (or not survive the split)."""
    kind = type(module).__module__
    if isinstance(module, torch.jit.ScriptModule):
        problem, fix = "is a TorchScript module (its weights live in compiled code, not in parameters)", (
            "prepare the eager nn.Module (before torch.jit.script/trace) and script it in the actor after loading")
    elif kind.startswith("torch._dynamo"):  # torch.compile's OptimizedModule
        problem, fix = "is a torch.compile'd module", (
            "prepare the original module (compiled._orig_mod) and call torch.compile on the loaded model in the actor")
    elif torch.nn.utils.parametrize.is_parametrized(module):
        problem, fix = "is parametrized (torch.nn.utils.parametrize / parametrizations.weight_norm)", (
            "bake the parametrization in first: torch.nn.utils.parametrize.remove_parametrizations(module, "
            f"{next(iter(cast(torch.nn.ModuleDict, module.parametrizations)))!r}) (leave_parametrized=True is the default)")
    elif kind.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
        problem, fix = f"is a quantized module ({type(module).__qualname__}) whose packed weights are not tensors", (
            "prepare the float model and quantize it in the actor after loading, or dequantize it")
    else:
        return
    raise UnsupportedModelError(name, problem, fix)


def refuse_unshared(t: torch.Tensor, name: str | None) -> None:
    """A tensor outside parameters and buffers that cannot travel as bytes would be pickled into the
    skeleton, a private copy in every actor: refuse it in the driver, naming it and its size."""
    try:
        size = t.nbytes
    except RuntimeError:  # sparse: the size of the equivalent dense tensor
        size = t.numel() * t.element_size()
    what = f"tensor {name!r}" if name else f"a tensor of shape {tuple(t.shape)} reached through a plain attribute"
    raise UnsupportedModelError(
        name.rpartition(".")[0] if name else "",
        f"{what} ({size / 2**20:.2f} MiB, {type(t).__qualname__}, {t.layout}, {t.dtype}) is held outside "
        "parameters and buffers and cannot be shared as plain bytes, so every actor would get its own copy",
        "make it a dense plain tensor before preparing (.to_dense(), .dequantize(), .as_subclass(torch.Tensor)), "
        "or create it in the actor after loading",
    )
