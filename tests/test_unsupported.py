"""Models the library cannot split either work (checked in an actor) or are refused at prepare
time, in the driver, with an error naming the submodule and the fix."""

from __future__ import annotations

import threading
import warnings

import pytest
import ray
import torch
from torch import nn
from torch.nn.utils import parametrize

from ray_zerocopy import UnsupportedModelError, load_model_in_actor, prepare_model_for_actors


class Wrap(nn.Module):
    """Puts the case one level down, so the error must name a submodule, not just the root."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.head(x))


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).T


class HoldsLock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lock = threading.Lock()


def _parametrized() -> nn.Module:
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Symmetric())
    return lin


def _quantized() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)


REFUSED = {
    # case: (build the inner module, the submodule the error must name, words the fix must contain)
    "torchscript": (lambda: torch.jit.script(nn.Linear(4, 4)), "inner", "before torch.jit.script"),
    "traced": (lambda: torch.jit.trace(nn.Linear(4, 4), torch.randn(1, 4)), "inner", "before torch.jit.script/trace"),
    "compiled": (lambda: torch.compile(nn.Linear(4, 4)), "inner", "_orig_mod"),
    "parametrize": (_parametrized, "inner", "remove_parametrizations(module, 'weight')"),
    "weight_norm": (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), "inner", "remove_parametrizations"),
    "quantized": (_quantized, "inner.0", "quantize it in the actor"),
    "unpicklable": (lambda: nn.Sequential(nn.ReLU(), HoldsLock()), "inner.1", "make the module picklable"),
    "lazy": (lambda: nn.LazyLinear(4), "inner", "run a forward pass"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_at_prepare_naming_submodule_and_fix(ray_local, case):
    build, submodule, fix = REFUSED[case]
    model = Wrap(build())
    with pytest.raises(UnsupportedModelError) as info:
        prepare_model_for_actors(model)
    assert info.value.submodule == submodule, str(info.value)
    assert f"submodule {submodule!r}" in str(info.value) and fix in str(info.value)


def test_compiled_root_refused(ray_local):
    with pytest.raises(UnsupportedModelError, match=r"submodule '<root>': is a torch.compile'd module.*_orig_mod"):
        prepare_model_for_actors(torch.compile(nn.Linear(4, 4)))


@ray.remote(num_cpus=0.5)
def _run(ref, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import copy

    model = load_model_in_actor(ref)
    with torch.no_grad():
        return model(x), copy.deepcopy(model)(x)  # the deepcopy is private, a reference in the same worker


@pytest.mark.parametrize("case", ["legacy_weight_norm", "baked_parametrization"])
def test_supported_variants_work_in_an_actor(ray_local, case):
    if case == "legacy_weight_norm":  # hook-based weight_norm: weight_g / weight_v are plain parameters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner = nn.utils.weight_norm(nn.Linear(4, 4))
    else:  # the fix the parametrize error gives
        inner = _parametrized()
        parametrize.remove_parametrizations(inner, "weight")
    torch.manual_seed(0)
    model = Wrap(inner).eval()
    x = torch.randn(3, 4)
    got, reference = ray.get(_run.remote(prepare_model_for_actors(model), x))
    assert torch.equal(got, reference)
    torch.testing.assert_close(got, model(x).detach())
