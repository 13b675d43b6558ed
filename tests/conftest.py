"""Shared fixtures: one local Ray for the session, and every registered backend as a parameter.

Tiers (see docs/development.md):
- unit tests (``@pytest.mark.unit``): no Ray at all, seconds; ``pytest -m unit``.
- per backend: a test that takes the ``backend`` fixture runs once per registered backend. Only the
  conformance kit (test_conformance.py) and tests about how a backend differs (the GPU paths, in-place
  writes into its mappings) take it; every other integration test uses the default backend
  (``object_store``). A test marked ``other_backends_slow`` (where Ray moves or loses a backend's
  objects: several nodes, a dead owner, a put from checkpoint files) takes ``backend`` too, but runs
  on the other backends only in the slow tier.
- slow tests (``@pytest.mark.slow``: big models, pressure, Serve, examples, the benchmark, waits of
  tens of seconds) are deselected by default (``addopts`` in pyproject.toml): ``pytest -m slow``
  runs them, ``pytest -m ""`` runs everything.

The fake test transport (tests/fake_backend_plugin) is pip-installed into a temporary
folder, once, while the tests are collected, and only where a test that may run needs it (it takes
``backend`` or ``fake_backend``): a real distribution with a real ``ray_zerocopy`` entry point,
visible to the driver (sys.path) and to every Ray worker (PYTHONPATH, inherited: hence at collection,
before any test starts Ray). ``pytest -m unit`` installs nothing.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

HERE = Path(__file__).parent
FAKE_BACKEND = "fake_per_tensor"
DEFAULT_BACKEND = "object_store"
# address="local": never join a cluster that someone started on this machine with `ray start`
RAY_INIT = dict(address="local", num_cpus=8, object_store_memory=1536 * 1024**2, include_dashboard=False, log_to_driver=False)


NEEDS_FAKE = {"backend", "fake_backend"}  # fixtures of the tests that need the fake plugin installed


def _install_fake_backend(config: pytest.Config) -> str:
    """Install the fake plugin into a temporary folder (once per session) and put it on both paths."""
    target = getattr(config, "_rzc_fake_backend", None)
    if target is None:
        target = tempfile.mkdtemp(prefix="rzc-fake-backend-")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--target", target, str(HERE / "fake_backend_plugin")],
            check=True,
        )
        sys.path.insert(0, target)
        importlib.invalidate_caches()  # (the folder is new: importlib.metadata must look at it afresh)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p)
        config._rzc_fake_backend = target
    return target


def _may_be_selected(metafunc: pytest.Metafunc) -> bool:
    """Whether ``-m`` may keep a test of this function: its own marks, or those with every mark one of its
    parameters may add (``slow`` where ``other_backends_slow``, ``pytest.param(..., marks=...)``), match the
    expression. True where pytest's matcher is not there as used here (an older or newer pytest: the plugin
    is then installed as before)."""
    expr = metafunc.config.option.markexpr
    if not expr:
        return True
    try:
        from _pytest.mark import MarkMatcher  # (how pytest's own -m deselection matches; not public API)
        from _pytest.mark.expression import Expression
    except ImportError:
        return True
    own = list(metafunc.definition.iter_markers())
    added = [pytest.mark.slow.mark] if any(m.name == "other_backends_slow" for m in own) else []
    for mark in own:
        values = mark.kwargs.get("argvalues", mark.args[1] if len(mark.args) > 1 else ())
        if mark.name == "parametrize" and isinstance(values, (list, tuple)):  # (a generator must not be consumed)
            added += [m for value in values for m in getattr(value, "marks", ())]
    if not hasattr(MarkMatcher, "from_markers"):  # (pytest < 8.1)
        return True
    compiled = Expression.compile(expr)
    return any(compiled.evaluate(MarkMatcher.from_markers(marks)) for marks in (own, own + added))


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD"):
        raise pytest.UsageError("the test suite needs entry-point autoload: unset RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD")
    # workers import test modules whose classes Ray pickles by reference (and, once installed, the fake backend)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not NEEDS_FAKE & set(metafunc.fixturenames):
        return
    if not _may_be_selected(metafunc):  # (deselected by -m: neither the plugin nor the registry is needed)
        if "backend" in metafunc.fixturenames:
            metafunc.parametrize("backend", [DEFAULT_BACKEND])
        return
    _install_fake_backend(metafunc.config)
    if "backend" in metafunc.fixturenames:
        from ray_zerocopy.plugins import backend_names

        names = backend_names()
        assert FAKE_BACKEND in names, f"the fake test backend did not register: {names}"
        if metafunc.definition.get_closest_marker("other_backends_slow"):
            names = [n if n == DEFAULT_BACKEND else pytest.param(n, marks=pytest.mark.slow) for n in names]
        metafunc.parametrize("backend", names)


@pytest.fixture(scope="session")
def fake_backend(request: pytest.FixtureRequest) -> str:
    """The folder the fake test plugin is installed in (on sys.path and PYTHONPATH): installed while the
    tests were collected, because this fixture was requested (see :func:`pytest_generate_tests`)."""
    return _install_fake_backend(request.config)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request: pytest.FixtureRequest):
    """A test marked ``unit`` must not start Ray in this process (it would not be a unit test)."""
    if request.node.get_closest_marker("unit") is None or ray.is_initialized():
        yield
        return
    yield
    assert not ray.is_initialized(), f"{request.node.nodeid} is marked unit but started Ray"


RAY_FIXTURES = {"ray_session", "ray_local", "ray_gpu"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus: int | None = None
    for item in items:
        if item.get_closest_marker("unit") and RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} is marked unit but uses a Ray fixture")
        if (gpu := item.get_closest_marker("gpu")) is not None:  # the one GPU marker: gpu, or gpu(count=2)
            if gpus is None:
                import torch

                gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            need = gpu.kwargs.get("count", 1)
            if gpus < need:
                item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), {gpus} visible here; "
                                                        "GPU tests run on a GPU machine"))


def start_local_ray() -> None:
    """The suite's standard local Ray (idempotent). Tests that need their own cluster shut it down
    first and call this again when they are done."""
    if not ray.is_initialized():
        ray.init(**RAY_INIT)


@pytest.fixture(scope="session")
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The session's local Ray, restarted if a multi-node test replaced it."""
    start_local_ray()
    yield
