"""The built wheel is complete: backends install as ray_zerocopy.backends, never as top-level `backends`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ["object_store.py", "safetensors_blob.py", "packed.py"]


@pytest.mark.unit
def test_wheel_ships_backends_under_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("ray_zerocopy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in BUILTINS:
        assert f"ray_zerocopy/backends/{module}" in names, sorted(names)
    assert "ray_zerocopy/py.typed" in names
    assert not [n for n in names if n.startswith(("backends/", "tests/", "examples/"))], sorted(names)

    # install it alone, and import it from a folder that is not the checkout
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    probe = (
        "import importlib.util as u, ray_zerocopy.backends.object_store as m, ray_zerocopy.plugins as p;"
        f"assert m.__file__.startswith({str(site)!r}), m.__file__;"
        "assert u.find_spec('backends') is None;"
        "print(p.backend_names())"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for module in BUILTINS:
        assert module.removesuffix(".py").replace("_blob", "") in out.stdout
