"""Bad input gets a typed error naming the value, the expectation and the fix."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import ray
import torch

from ray_zerocopy import (
    BackendMismatchError,
    DeviceError,
    DuplicateBackendError,
    FormatVersionError,
    InvalidModelRefError,
    NotAModuleError,
    UnknownBackendError,
    UnsupportedModelError,
)
from ray_zerocopy.actor import load_model_in_actor, prepare_model_for_actors, resolve_device
from ray_zerocopy.testing import zoo_model


@pytest.fixture(scope="module")
def ref(ray_session):
    return prepare_model_for_actors(zoo_model("hard_cases"))


@ray.remote
def _load(ref, **kwargs):
    return type(load_model_in_actor(ref, **kwargs)).__name__


def test_not_a_module(ray_local):
    with pytest.raises(NotAModuleError, match=r"got collections.OrderedDict.*Fix:") as info:
        prepare_model_for_actors(zoo_model("hard_cases").state_dict())
    assert isinstance(info.value, TypeError)


def test_unknown_backend_lists_registered_names(ray_local):
    with pytest.raises(UnknownBackendError, match=r"'nope'.*object_store.*installed") as info:
        prepare_model_for_actors(torch.nn.Linear(2, 2), backend="nope")
    assert "object_store" in info.value.available and isinstance(info.value, ValueError)


def test_backend_mismatch(ref):
    with pytest.raises(BackendMismatchError, match=r"backend='fake_per_tensor'.*'object_store'.*Fix"):
        load_model_in_actor(ref, backend="fake_per_tensor")


def test_backend_not_installed_where_the_actor_runs(ref):
    foreign = dataclasses.replace(ref, backend="backend_only_on_the_driver")
    with pytest.raises(UnknownBackendError, match="installed"):
        ray.get(_load.remote(foreign))


def test_format_version_mismatch(ref):
    with pytest.raises(FormatVersionError, match="version 99"):
        ray.get(_load.remote(dataclasses.replace(ref, format_version=99)))


@pytest.mark.parametrize("device, reason, fix", [
    ("cuda", "no CUDA device is visible", "num_gpus"), ("cuda:3", "no CUDA device", "num_gpus"),
    ("banana", "not a device name", "pass 'cpu', 'cuda' or 'cuda:N'"),  # (a typo: asking Ray for a GPU would not help)
])
def test_device_that_does_not_exist_on_the_actor(ref, device, reason, fix):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match=f"{reason}.*{fix}"):
        ray.get(_load.remote(ref, device=device))


def test_cpu_device_forms(ray_local):
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(torch.device("cpu"))


@pytest.mark.parametrize("value", [None, "a path", {"weights": 1}])
def test_not_a_model_ref(ray_local, value):
    with pytest.raises(InvalidModelRefError, match="prepare_model_for_actors"):
        load_model_in_actor(value)


def test_meta_weights_are_refused_in_the_driver(ray_local):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(UnsupportedModelError, match=r"'0'.*meta.*Fix"):
        prepare_model_for_actors(model)


DUPLICATE = """
import ray_zerocopy
from ray_zerocopy import hookimpl, plugins
from ray_zerocopy.backends.object_store import ObjectStoreBackend

class Impostor(ObjectStoreBackend):
    pass

class Plugin:
    @hookimpl
    def register_backends(self, register):
        register(Impostor)

plugins.register_plugin(Plugin(), name="impostor-plugin")
try:
    plugins.backend_names()
except ray_zerocopy.DuplicateBackendError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.unit
def test_duplicate_backend_name_names_both_plugins():
    out = subprocess.run([sys.executable, "-c", DUPLICATE], capture_output=True, text=True, timeout=120)
    assert "DuplicateBackendError" in out.stdout, out.stderr[-2000:]
    assert "ray_zerocopy.backends.object_store" in out.stdout and "impostor-plugin" in out.stdout
    assert DuplicateBackendError.__mro__[2] is ValueError
