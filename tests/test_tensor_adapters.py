"""A third party's tensor type travels once it registers a TensorAdapter (the way a backend plugin does), and
the conformance kit checks adapters, the built-in ones included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_zerocopy import TensorAdapter, UnsupportedModelError, hookimpl, prepare_model_for_actors
from ray_zerocopy.testing import check_tensor_adapter


class ScaledInt8(nn.Parameter):
    """A third party's quantized weight outside PyTorch's flatten protocol: int8 data plus a scale attribute."""

    @staticmethod
    def quantize(w: torch.Tensor) -> ScaledInt8:
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        q = torch.Tensor._make_subclass(ScaledInt8, (w / scale).round().to(torch.int8), False)
        q.scale = scale
        return q


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = ScaledInt8.quantize(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.as_subclass(torch.Tensor).float() * self.weight.scale, self.bias)


class ScaledInt8Adapter(TensorAdapter):
    name = "scaled_int8"

    def handles(self, t: torch.Tensor) -> bool:
        return type(t) is ScaledInt8

    def flatten(self, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        return {"data": t.data, "scale": t.scale}, None

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], meta: None) -> torch.Tensor:
        q = torch.Tensor._make_subclass(ScaledInt8, inner["data"], False)
        q.scale = inner["scale"]
        return q


class LeakyAdapter(ScaledInt8Adapter):
    """Puts the scale into the metadata: pickled into every actor, not shared. The kit must say so."""

    name = "leaky_scaled_int8"

    def flatten(self, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # type: ignore[override]
        return {"data": t.data}, t.scale

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], meta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().unflatten({**inner, "scale": meta}, None)


class Plugin:
    """What a third-party package's entry point (group ``ray_zerocopy``) would point at."""

    def __init__(self, adapter: type[TensorAdapter]) -> None:
        self.adapter = adapter

    @hookimpl
    def register_tensor_adapters(self, register):
        register(self.adapter)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Int8Linear(nn.Linear(16, 32)), nn.ReLU(), Int8Linear(nn.Linear(32, 8))).eval()


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def _example(model: nn.Module) -> torch.Tensor:
    return model(X)


def test_unregistered_type_is_refused_then_a_registered_adapter_passes_the_kit(ray_local):
    with pytest.raises(UnsupportedModelError, match=r"tensor '0\.weight' is a test_tensor_adapters\.ScaledInt8"):
        prepare_model_for_actors(_model())
    passed = check_tensor_adapter("scaled_int8", _model(), _example, plugin=Plugin(ScaledInt8Adapter))
    assert passed == ["flatten and unflatten", "load through object_store", "load through packed",
                      "load through safetensors"]
    with pytest.raises(UnsupportedModelError):  # the kit leaves the registry as it found it
        prepare_model_for_actors(_model())


def test_kit_catches_metadata_that_carries_tensor_data(ray_local):
    with pytest.raises(AssertionError, match=r"metadata does not pickle without tensor data"):
        check_tensor_adapter("leaky_scaled_int8", _model(), _example, plugin=Plugin(LeakyAdapter),
                             backends=("object_store",))


@pytest.mark.slow
def test_builtin_adapters_pass_the_kit(ray_local):
    from test_quantized import IDS, _built

    for adapter, recipe in [("bitsandbytes", "hf-bnb-nf4"), ("bitsandbytes", "hf-bnb-8bit"),
                            ("wrapper_subclass", "torchao-int8-dynamic"), ("wrapper_subclass", "quanto-qint4")]:
        check_tensor_adapter(adapter, _built(recipe)[0], lambda m: m(IDS).logits)
