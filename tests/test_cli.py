"""`python -m ray_zerocopy backends`: each transport with the plugin and distribution providing it."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
from conftest import FAKE_BACKEND

BUILTINS = {
    "object_store": "ray_zerocopy.backends.object_store",
    "safetensors": "ray_zerocopy.backends.safetensors_blob",
    "packed": "ray_zerocopy.backends.packed",
}


def list_backends(*args: str, disable_autoload: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD"}
    if disable_autoload:
        env["RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    # PYTHONPATH (set by conftest) carries the fake plugin's distribution, where installed, to the subprocess
    return subprocess.run([sys.executable, "-m", "ray_zerocopy", "backends", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """backend -> (plugin, distribution), from the table above the blank line."""
    table = stdout.split("\n\n")[0].splitlines()
    assert table[0].split() == ["backend", "plugin", "distribution"]
    return {cells[0]: (cells[1], " ".join(cells[2:])) for cells in (line.split() for line in table[1:])}


def test_lists_every_backend_with_plugin_and_distribution(fake_backend):  # (not unit: the fake plugin is installed)
    out = list_backends()
    assert out.returncode == 0, out.stderr
    found = rows(out.stdout)
    for name, module in BUILTINS.items():
        assert found[name] == (module, "built-in")
    version = importlib.metadata.version("rzc-fake-backend")
    assert found[FAKE_BACKEND] == (FAKE_BACKEND, f"rzc-fake-backend {version}")
    assert f"{len(found)} backend(s)" in out.stdout


@pytest.mark.unit
def test_example_package_is_listed_when_installed():
    try:
        version = importlib.metadata.version("rzc-safetensors-file")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("examples/custom_backend is not installed here (CI installs it)")
    assert rows(list_backends().stdout)["safetensors_file"] == ("safetensors_file", f"rzc-safetensors-file {version}")


@pytest.mark.unit
def test_env_var_turns_entry_point_autoload_off():
    out = list_backends(disable_autoload=True)
    assert out.returncode == 0, out.stderr
    found = rows(out.stdout)
    assert set(BUILTINS) <= set(found) and FAKE_BACKEND not in found and "safetensors_file" not in found
    assert {dist for _, dist in found.values()} == {"built-in"}, "entry-point plugins must not load"
    assert "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD=1" in out.stdout


@pytest.mark.unit
def test_extra_arguments_are_refused():
    out = list_backends("--all")
    assert out.returncode == 2 and "'backends' takes no arguments" in out.stderr


@pytest.mark.unit
def test_bench_help_shows_the_bench_options():
    out = subprocess.run([sys.executable, "-m", "ray_zerocopy", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--model" in out.stdout and "--approaches" in out.stdout and "--device" in out.stdout
    # what the benchmark does, in a user's words: not a developer's docstring, no reST markup
    description = out.stdout.split("options:")[0]
    assert "Compare ray_zerocopy with" in description and "ray.put(model)" in description, description
    assert "``" not in out.stdout and "cli.py" not in out.stdout and "examples:" in out.stdout


@pytest.mark.unit
def test_every_bench_option_has_help():
    import argparse

    from ray_zerocopy.bench.options import _parser

    undocumented = [a.option_strings for a in _parser()._actions if not a.help and a.help != argparse.SUPPRESS]
    assert undocumented == []


@pytest.mark.unit
def test_top_level_help_names_each_command_in_plain_text():
    out = subprocess.run([sys.executable, "-m", "ray_zerocopy", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "``" not in out.stdout and ":func:" not in out.stdout, out.stdout
    lines = out.stdout.splitlines()
    for command, words in (("backends", "list the weight transports"), ("bench", "compare ray_zerocopy")):
        assert any(line.split()[:1] == [command] and words in line for line in lines), out.stdout
