"""``backends/`` (top level in the repository) imports as ``ray_zerocopy.backends`` everywhere: from a built
wheel (complete, and no top-level ``backends`` installed), an editable install, a source checkout, and in Ray
workers of a driver started from the repository root. Building and installing take tens of seconds: slow tier."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ["object_store.py", "safetensors_blob.py", "packed.py"]
# where ray_zerocopy and one built-in backend come from, what is registered, and that no top-level `backends` exists
PROBE = (
    "import importlib.util as u, ray_zerocopy as r, ray_zerocopy.backends.object_store as m, ray_zerocopy.plugins as p;"
    "print(r.__file__); print(m.__file__); print(p.backend_names());"
    "print(u.find_spec('backends') is None)"
)


def _probe(cwd: Path, pythonpath: str, code: str = PROBE) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": pythonpath, "PATH": "", "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def _build_wheel(tmp_path: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    return next(tmp_path.glob("ray_zerocopy-*.whl"))


@pytest.mark.slow
def test_wheel_ships_backends_under_the_package(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for module in BUILTINS:
        assert f"ray_zerocopy/backends/{module}" in names, sorted(names)
    assert "ray_zerocopy/py.typed" in names
    assert not [n for n in names if n.startswith(("backends/", "tests/", "examples/"))], sorted(names)

    # install it alone, and import it from a folder that is not the checkout
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    root_file, backend_file, names_line, no_top_level = _probe(tmp_path, str(site))
    assert root_file.startswith(str(site)) and backend_file.startswith(str(site / "ray_zerocopy" / "backends"))
    for module in BUILTINS:
        assert module.removesuffix(".py").replace("_blob", "") in names_line
    assert no_top_level == "True"

    # the known trap of the mapping: run from the repository root, the checkout's ray_zerocopy (no backends/
    # inside) shadows the installed one; it maps the checkout's backends/ (never a mix of the two)
    root_file, backend_file, names_line, _ = _probe(ROOT, str(site))
    assert root_file.startswith(str(ROOT / "ray_zerocopy")) and backend_file == str(ROOT / "backends" / "object_store.py")
    assert "packed" in names_line


@pytest.mark.slow
def test_editable_install_and_source_checkout_import_the_backends(tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--prefix", str(prefix), "-e", str(ROOT)], check=True, capture_output=True, timeout=300)
    site = next(prefix.glob("lib/python*/site-packages"))
    finder = next(site.glob("__editable___ray_zerocopy*_finder.py")).stem
    editable = (  # what its .pth does, with an editable install already in this venv set aside
        "import importlib, sys;"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')];"
        "[sys.modules.pop(m) for m in list(sys.modules) if m.startswith('__editable__')];"
        f"sys.path.insert(0, {str(site)!r}); importlib.import_module({finder!r}).install();" + PROBE
    )
    # an editable install (no top-level `backends` installed), and PYTHONPATH=checkout (where the folder is one)
    for lines, top_level in ((_probe(tmp_path, "", editable), False), (_probe(tmp_path, str(ROOT)), True)):
        root_file, backend_file, names_line, no_top_level = lines
        assert root_file == str(ROOT / "ray_zerocopy" / "__init__.py")
        assert backend_file == str(ROOT / "backends" / "object_store.py")
        assert "packed" in names_line and no_top_level == str(not top_level)


@pytest.mark.slow
def test_ray_workers_of_a_driver_in_the_repository_root_import_the_backends():
    code = (
        "import ray, ray_zerocopy;"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False);"
        "f = ray.remote(lambda: __import__('ray_zerocopy.backends.packed').backends.packed.__file__);"
        "print(ray.get(f.remote()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == str(ROOT / "backends" / "packed.py")
