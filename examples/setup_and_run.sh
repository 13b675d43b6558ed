#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the Ray Data example (several actors, one model).
# Usage (from the repository root):  bash examples/setup_and_run.sh [example options, e.g. --small]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU build of torch first: an unpinned `torch` would pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# the example third-party transport (an entry-point plugin), so the tests check it too
.venv/bin/python -m pip install -q -e examples/custom_backend
.venv/bin/python -m ray_zerocopy backends
.venv/bin/python examples/ray_data_actor_example.py "$@"
