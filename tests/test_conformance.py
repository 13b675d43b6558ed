"""The conformance kit passes every registered transport and catches broken ones.

Every registered backend runs the kit: the built-ins, the fake test plugin, and the
example third-party package (examples/custom_backend) wherever it is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import time

import pytest
import torch

from ray_zerocopy import PayloadError, hookimpl
from ray_zerocopy.backends.object_store import ObjectStoreBackend, ObjectStorePayload
from ray_zerocopy.backends.packed import PackedBackend
from ray_zerocopy.plugins import backend_infos, backend_names, get_backend
from ray_zerocopy.testing import GENERIC_BAD_PAYLOADS, KIT_MODELS, check_backend, dtype_zoo

EXAMPLE_DIST, EXAMPLE_BACKEND = "rzc-safetensors-file", "safetensors_file"


@pytest.mark.other_backends_slow  # (the whole kit per backend)
def test_backend_passes_the_conformance_kit(ray_local, backend):
    passed = check_backend(backend)
    assert passed[:1 + len(KIT_MODELS)] == ["dtype round trip", *(f"model {m}" for m in KIT_MODELS)]
    assert len(passed) == 1 + len(KIT_MODELS) + len(GENERIC_BAD_PAYLOADS)


@pytest.mark.gpu
def test_backend_passes_the_conformance_kit_on_gpu(ray_local, backend):
    assert check_backend(backend, device="cuda")[0] == "dtype round trip"


# ---------------------------------------------------------------- the kit catches what is wrong


class _Plugin:
    """A plugin object registering one backend class (the kit registers it in the driver and each task)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    @hookimpl
    def register_backends(self, register):
        register(self.cls)


class CopiesButClaimsZeroCopy(ObjectStoreBackend):
    name = "kit_copies"

    def get(self, payload, device):
        return {k: t.clone() for k, t in super().get(payload, device).items()}


class WritesItsInput(ObjectStoreBackend):
    name = "kit_writes_input"

    def put(self, weights):
        payload = super().put(weights)
        if "matrix" in weights:  # the kit's dtype zoo (the caller's tensors: in real use, the user's model)
            weights["matrix"].zero_()
        return payload


class FlipsABit(ObjectStoreBackend):
    name = "kit_flips"
    zero_copy = False

    def get(self, payload, device):
        out = {k: t.clone() for k, t in super().get(payload, device).items()}
        largest = max(out, key=lambda k: out[k].nbytes)
        out[largest].reshape(-1).view(torch.uint8)[0] ^= 1
        return out


class Misaligns(ObjectStoreBackend):
    """Copies each tensor 8 bytes past a 64-byte boundary (what the safetensors blob did before it was padded)."""
    name = "kit_misaligns"
    zero_copy = False

    def get(self, payload, device):
        out = {}
        for k, t in super().get(payload, device).items():
            raw = torch.empty(t.nbytes + 8, dtype=torch.uint8)[8:]
            raw.copy_(t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8))
            out[k] = raw.view(t.dtype).view(t.shape) if t.numel() else t
        return out


class AcceptsGarbage(ObjectStoreBackend):
    name = "kit_accepts"

    def get(self, payload, device):
        return super().get(payload, device) if isinstance(payload, ObjectStorePayload) else {}


class CrashesOrHangs(ObjectStoreBackend):
    name = "kit_crashes"

    def get(self, payload, device):
        if payload is None:
            time.sleep(3600)
        if not isinstance(payload, ObjectStorePayload):
            os._exit(3)  # what a segfault in a native reader looks like to Ray
        return super().get(payload, device)


class CrashesOnGarbage(ObjectStoreBackend):
    name = "kit_crashes_only"

    def get(self, payload, device):
        if not isinstance(payload, ObjectStorePayload):
            os._exit(3)
        return super().get(payload, device)


class PackedUnderAnotherName(PackedBackend):
    name = "kit_packed"


@pytest.mark.parametrize("cls, words", [
    (CopiesButClaimsZeroCopy, "zero_copy=True, but"),
    (WritesItsInput, "put\\(\\) changed its input tensor 'matrix'"),
    (FlipsABit, "differs"),
    (AcceptsGarbage, "returned a dict instead of raising"),
    (Misaligns, "not 64-byte aligned \\('bfloat16' at 8 mod 64"),
])
def test_kit_reports_wrong_results(ray_local, cls, words):
    with pytest.raises(AssertionError, match=words) as info:
        check_backend(cls.name, plugin=_Plugin(cls), models=("hard_cases",))
    assert f"backend {cls.name!r} failed" in str(info.value)
    assert cls.name not in backend_names()  # the kit unregistered it again


def test_kit_reports_crash(ray_local):
    """The crash half of the next test, without its 45 s wait for the hang (default tier)."""
    with pytest.raises(AssertionError) as info:
        check_backend(CrashesOnGarbage.name, plugin=_Plugin(CrashesOnGarbage), models=("hard_cases",))
    message = str(info.value)
    assert "bad payload 42: crashed the worker process" in message and "bad payload None: crashed" in message
    assert "model hard_cases" not in message and "dtype round trip" not in message
    assert CrashesOnGarbage.name not in backend_names()


@pytest.mark.slow  # waits out the 45 s timeout of the hanging payload
def test_kit_reports_crash_and_hang(ray_local):
    with pytest.raises(AssertionError) as info:
        check_backend(CrashesOrHangs.name, plugin=_Plugin(CrashesOrHangs), models=("hard_cases",), timeout_s=45)
    message = str(info.value)
    assert "bad payload None: did not finish within 45 s" in message
    assert "bad payload 42: crashed the worker process" in message
    assert "model hard_cases" not in message  # the good payloads still passed


def test_kit_passes_a_good_backend_given_as_plugin_and_runs_custom_corruptions(ray_local):
    def truncated(payload):
        return [type(payload)(payload.ref, payload.nbytes + 64, payload.index)]  # buffer shorter than the index says

    passed = check_backend(PackedUnderAnotherName.name, plugin=_Plugin(PackedUnderAnotherName),
                           models=("hard_cases",), bad_payloads=truncated)
    assert passed[-1].startswith("bad payload PackedPayload(")
    assert PackedUnderAnotherName.name not in backend_names()


def test_kit_rejects_unknown_backend(ray_local):
    with pytest.raises(AssertionError, match="unknown ray_zerocopy backend 'no_such'"):
        check_backend("no_such")


# ---------------------------------------------------------------- the example third-party package


def example_distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(EXAMPLE_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{EXAMPLE_DIST} is not installed here (CI installs it: pip install examples/custom_backend)")


@pytest.mark.unit
def test_example_entry_point_is_found_when_installed():
    dist = example_distribution()
    eps = [(ep.name, ep.value) for ep in dist.entry_points if ep.group == "ray_zerocopy"]
    assert eps == [(EXAMPLE_BACKEND, "rzc_safetensors_file")]
    info = backend_infos()[EXAMPLE_BACKEND]
    assert (info.plugin, info.distribution) == (EXAMPLE_BACKEND, f"{EXAMPLE_DIST} {dist.version}")


def test_example_reports_missing_and_damaged_files(ray_local, tmp_path, monkeypatch):
    example_distribution()
    monkeypatch.setenv("RZC_SAFETENSORS_FILE_DIR", str(tmp_path))
    backend = get_backend(EXAMPLE_BACKEND)
    payload = backend.put(dtype_zoo())
    assert os.path.dirname(payload.path) == str(tmp_path)
    with open(payload.path, "r+b") as f:  # a header length past the end of the file
        f.write((10**9).to_bytes(8, "little"))
    with pytest.raises(PayloadError, match="not a valid safetensors file"):
        backend.get(payload, torch.device("cpu"))
    os.remove(payload.path)
    with pytest.raises(PayloadError, match="missing or empty.*RZC_SAFETENSORS_FILE_DIR"):
        backend.get(payload, torch.device("cpu"))
