"""Every public error is importable from the package root, and its message is short, says the fix, and fits
the case (no Ray: a unit test)."""

from __future__ import annotations

import inspect

import pytest
import torch

import ray_zerocopy
from ray_zerocopy import errors
from ray_zerocopy._env import env_number
from ray_zerocopy.load import resolve_device

pytestmark = pytest.mark.unit


def test_every_error_class_is_exported_from_the_root():
    public = {n for n, c in vars(errors).items()
              if inspect.isclass(c) and issubclass(c, errors.RayZeroCopyError) and not n.startswith("_")}
    assert public - set(ray_zerocopy.__all__) == set()


def test_weights_lost_message_is_short_and_cites_no_issue_number():
    err = errors.WeightsLostError(RuntimeError("ObjectLostError: object 00ff... was lost\nmore lines"))
    assert len(str(err)) < 400 and "Fix:" in str(err) and "issue" not in str(err)
    assert "ObjectLostError" in str(err) and "more lines" not in str(err)


def test_a_malformed_device_string_is_not_told_to_ask_for_gpus():
    with pytest.raises(errors.DeviceError, match="not a device name") as info:
        resolve_device("gpu0")
    assert "num_gpus" not in str(info.value) and "'cuda:N'" in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(errors.DeviceError, match="num_gpus=1"):  # (a missing GPU: ask Ray for one)
            resolve_device("cuda")


def test_env_numbers_default_parse_and_reject(monkeypatch):
    monkeypatch.delenv("RZC_TEST_N", raising=False)
    assert env_number("RZC_TEST_N", 2.5) == 2.5
    monkeypatch.setenv("RZC_TEST_N", "7")
    assert env_number("RZC_TEST_N", 2.5) == 7.0
    for bad in ("ten", "-1", "nan"):
        monkeypatch.setenv("RZC_TEST_N", bad)
        with pytest.raises(errors.EnvVarError, match=rf"RZC_TEST_N='{bad}': expected a number >= 0") as info:
            env_number("RZC_TEST_N", 2.5)
        assert isinstance(info.value, ValueError)


def test_a_plugin_registering_a_non_backend_gets_a_typed_error():
    err = errors.InvalidRegistrationError("my_plugin", dict)
    assert isinstance(err, TypeError) and "my_plugin" in str(err) and "Fix: subclass ray_zerocopy.Backend" in str(err)
    assert "ray_zerocopy.TensorAdapter subclass" in str(errors.InvalidRegistrationError("p", int, "TensorAdapter"))


def test_hf_config_without_a_known_architecture(tmp_path):
    pytest.importorskip("transformers")
    from ray_zerocopy.hf import _class_of

    class Config:
        architectures = ["NoSuchModelForAnything"]

    with pytest.raises(errors.CheckpointError, match=r"NoSuchModelForAnything.*Fix: pass model_class="):
        _class_of(Config(), tmp_path)
