"""A third-party plugin that fails is skipped with one warning naming it; everything else keeps working.

tests/broken_backend_plugin is a real distribution with two broken ``ray_zerocopy`` entry points (one
does not import, one's hook raises), pip-installed into a temporary folder and put on the PYTHONPATH of
subprocesses only, so the session's own plugin registry never sees it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_BACKEND

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory, fake_backend) -> dict[str, str]:
    target = tmp_path_factory.mktemp("rzc-broken-backend")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(HERE / "broken_backend_plugin")],
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH")) if p)  # + the fake backend
    return env


PREPARE_AND_LOAD = """
import warnings, ray, torch
warnings.simplefilter("always")
from ray_zerocopy import load_model_in_actor, plugins, prepare_model_for_actors
ray.init(address="local", num_cpus=1, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False)
try:
    model = torch.nn.Linear(4, 2)
    for backend in ("object_store", "FAKE"):
        loaded = load_model_in_actor(prepare_model_for_actors(model, backend=backend))
        assert torch.equal(loaded.weight, model.weight)
        print("OK", backend)
    print("BROKEN", sorted(b.plugin for b in plugins.broken_plugins()))
finally:
    ray.shutdown()
""".replace("FAKE", FAKE_BACKEND)


def test_built_in_and_other_plugins_work_with_one_warning_per_broken_plugin(broken_env):
    out = subprocess.run([sys.executable, "-c", PREPARE_AND_LOAD], env=broken_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"OK object_store\nOK {FAKE_BACKEND}\nBROKEN ['broken_hook', 'broken_import']" in out.stdout
    warned = [line for line in out.stderr.splitlines() if "PluginLoadWarning" in line]
    assert len(warned) == 2, out.stderr[-3000:]
    by_plugin = {("broken_import" if "'broken_import'" in w else "broken_hook"): w for w in warned}
    assert "rzc-broken-backend 0.1.0 (entry point broken_import = rzc_broken_import)" in by_plugin["broken_import"]
    assert "ModuleNotFoundError: No module named 'rzc_dependency_that_is_not_installed'" in by_plugin["broken_import"]
    assert "RuntimeError: this plugin's backend cannot start" in by_plugin["broken_hook"]
    for line in warned:
        assert "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD=1" in line and "built-in backends" in line
    assert "Traceback" not in out.stderr


def test_backends_command_lists_the_broken_plugins(broken_env):
    out = subprocess.run([sys.executable, "-m", "ray_zerocopy", "backends"], env=broken_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    table, broken = out.stdout.split("\n\n")[:2]
    assert "object_store" in table and FAKE_BACKEND in table and "broken" not in table
    assert "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD=1" in broken.splitlines()[0]
    assert ("BROKEN  broken_import  rzc-broken-backend 0.1.0 (entry point broken_import = rzc_broken_import): "
            "ModuleNotFoundError: No module named 'rzc_dependency_that_is_not_installed'") in broken
    assert ("BROKEN  broken_hook  rzc-broken-backend 0.1.0 (entry point broken_hook = rzc_broken_hook): "
            "RuntimeError: this plugin's backend cannot start") in broken
    assert out.stderr == "" and "Traceback" not in out.stdout


def test_autoload_switch_skips_broken_plugins_silently(broken_env):
    env = dict(broken_env, RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-m", "ray_zerocopy", "backends"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "BROKEN" not in out.stdout and out.stderr == "", out.stderr[-3000:]
