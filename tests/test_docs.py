"""The manual covers what the code has: every public error and every environment variable the code reads.
Reads files only (no Ray): a unit test. The site itself is built by `.ci/run` (mkdocs build --strict)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from ray_zerocopy import errors

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.unit


def _sources() -> list[Path]:
    return [*(ROOT / "ray_zerocopy").rglob("*.py"), *(ROOT / "backends").glob("*.py")]


def test_every_public_error_is_documented():
    page = (DOCS / "errors.md").read_text()
    public = [n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, Exception)
              and c.__module__ == errors.__name__ and not n.startswith("_")]
    assert len(public) >= 20
    assert [n for n in public if f"`{n}`" not in page] == []


def test_every_environment_variable_the_code_reads_is_documented():
    read = set()
    for path in _sources():
        text = path.read_text()
        read |= set(re.findall(r"""(?:environ\.get|getenv|env_number)\(\s*["']([A-Z0-9_]+)["']""", text))
        read |= set(re.findall(r"""^[A-Z_]*ENV\s*=\s*["']([A-Z0-9_]+)["']""", text, re.M))  # (FOO_ENV = "...")
    assert {"RAY_ZEROCOPY_H2D_THREADS", "RAY_ZEROCOPY_H2D_CHUNK_MB", "RAY_ZEROCOPY_KEEPER_FIRST_USE_S"} <= read
    page = (DOCS / "configuration.md").read_text()
    assert sorted(v for v in read if f"`{v}`" not in page) == []


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [p for p in pages if p not in nav] == []


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "bash examples/setup_and_run.sh" in first_screen and ".venv/bin/python -m pytest" in first_screen
    assert "pip install" in readme and "docs/" in readme
