"""Tensor adapters: how a weight that is not a plain tensor (a quantized tensor subclass) travels.

An adapter splits such a tensor, in the driver, into plain inner tensors (stored and shared like any
other weight, under ``<name>:<key>``) and small picklable metadata (kept in the skeleton), and rebuilds
it in the actor around the inner tensors it gets there: CPU views of shared memory, or tensors already
on the GPU. So a quantized model travels at its quantized size, and its forward runs unchanged.

Built in:

- ``wrapper_subclass``: PyTorch's protocol for wrapper tensor subclasses (``__tensor_flatten__`` /
  ``__tensor_unflatten__``, the one torch.compile, FSDP2 and DTensor rely on). Carries torchao's and
  optimum-quanto's quantized tensors, and any other subclass that implements it, nested ones too.
  It is tried after every other adapter, so a plugin can take over a type that implements the protocol.
- ``bitsandbytes`` (registered through the ``register_tensor_adapters`` hook, as third parties do):
  ``Params4bit`` (its ``QuantState``: absmax, code, nested statistics) and
  ``Int8Params`` (its ``CB`` / ``SCB``), which are ``nn.Parameter`` subclasses outside the protocol.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ray_zerocopy._tensors import view_key
from ray_zerocopy.hookspecs import hookimpl


class TensorAdapter:
    """Carries one kind of tensor that is not a plain tensor (subclass it, then register it).

    ``flatten`` runs in the driver, ``unflatten`` in the actor (so the adapter must be installed there:
    the skeleton names ``unflatten`` by import path). ``unflatten`` gets the inner tensors on the load
    device, as views of shared memory on a CPU: it must wrap them, never copy or write them.
    ``ray_zerocopy.testing.check_tensor_adapter`` checks an adapter end to end. A Parameter subclass with
    bytes of its own (not a wrapper subclass) returns them under the key ``"data"``: with ``share_gpu`` a
    model moved onto the GPU's shared copy moves that parameter's bytes too.
    """

    name: ClassVar[str]

    def handles(self, t: torch.Tensor) -> bool:
        """True if this adapter carries ``t``."""
        raise NotImplementedError

    def flatten(self, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """``t`` as ``({key: inner tensor}, metadata)``; inner tensors may be adapted tensors themselves.
        The metadata is pickled into the skeleton (keep it small: no tensor data)."""
        raise NotImplementedError

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], meta: Any) -> torch.Tensor:
        """The tensor rebuilt around ``inner`` (same keys as ``flatten`` gave) and ``meta``."""
        raise NotImplementedError


class WrapperSubclassAdapter(TensorAdapter):
    """PyTorch's wrapper-subclass protocol (torchao, optimum-quanto, ...)."""

    name = "wrapper_subclass"

    def handles(self, t: torch.Tensor) -> bool:
        return type(t) not in _PLAIN and hasattr(type(t), "__tensor_flatten__") and hasattr(
            type(t), "__tensor_unflatten__")

    def flatten(self, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        attrs, ctx = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return {a: getattr(t, a) for a in attrs}, (type(t), ctx, tuple(t.shape), tuple(t.stride()))

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], meta: Any) -> torch.Tensor:
        subclass, ctx, size, stride = meta
        return subclass.__tensor_unflatten__(inner, ctx, torch.Size(size), stride)


class BitsAndBytesAdapter(TensorAdapter):
    """bitsandbytes' ``Params4bit`` and ``Int8Params``: the packed data, plus the quantization state's
    tensors (``QuantState.as_dict()`` keys, the names bitsandbytes saves them under; the nested offset as a
    scalar tensor, not the number ``as_dict`` gives) and scales (``CB``, where it is the data, is not stored twice)."""

    name = "bitsandbytes"
    _TYPES = ("Params4bit", "Int8Params")
    _SCALES = ("CB", "SCB")

    def handles(self, t: torch.Tensor) -> bool:
        cls = type(t)
        return cls.__module__.startswith("bitsandbytes.") and cls.__name__ in self._TYPES

    def flatten(self, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        state = dict(vars(t))  # blocksize, quant_type, module, ...: pickled with the skeleton
        inner = {"data": t.data}
        quant = state.pop("quant_state", None)
        quant_meta = None
        if quant is not None:
            fields = quant.as_dict()
            if quant.nested:  # (as_dict clones the table: the stored one would be a copy, not the model's)
                fields["nested_quant_map"] = quant.state2.code
                fields["nested_offset"] = quant.offset  # (as_dict gives a number: pickled, a new version would miss it)
            inner.update({k: v for k, v in fields.items() if isinstance(v, torch.Tensor)})
            quant_meta = {k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}
        if isinstance(state.get("CB"), torch.Tensor) and view_key(state["CB"]) == view_key(t):
            state["CB"] = "data"  # (Int8Params' CB is its data: rebuilt as that, not stored as a second tensor)
        for key in self._SCALES:
            if isinstance(state.get(key), torch.Tensor):
                inner[key] = state.pop(key)
        return inner, (type(t), t.requires_grad, state, quant_meta)

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], meta: Any) -> torch.Tensor:
        param_cls, requires_grad, state, quant_meta = meta
        data = inner["data"]
        # what Params4bit/Int8Params.__new__ do, without quantizing again: the data is quantized already
        param = torch.Tensor._make_subclass(param_cls, data, requires_grad)
        param.__dict__.update(state)
        if quant_meta is not None:
            from bitsandbytes.functional import QuantState

            tensors = {k: v for k, v in inner.items() if k not in ("data", *cls._SCALES)}
            offset = tensors.pop("nested_offset", None)  # (from_dict wants a number: the stored tensor goes in after)
            settings = {**quant_meta, **tensors, **({} if offset is None else {"nested_offset": 0.0})}
            param.quant_state = QuantState.from_dict(settings, device=data.device)
            if offset is not None:
                param.quant_state.offset = offset
        for key in cls._SCALES:
            if key in inner:
                setattr(param, key, inner[key])
        if isinstance(state.get("CB"), str):
            param.CB = data
        return param


_PLAIN = (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor))


@hookimpl
def register_tensor_adapters(register: Any) -> None:
    register(BitsAndBytesAdapter)
