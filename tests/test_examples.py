"""The examples a user copies run end to end on a tiny model and check their outputs against the driver's."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
pytestmark = pytest.mark.slow


def run_example(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each example starts its own local Ray
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=540, env=env)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_example():
    out = run_example("serve_deployment.py", "--small", "--compare", "--port", str(free_port()))
    checks = re.findall(r"\[(\w+)\] 4 replicas ready .* max \|diff\| vs driver model: \S+ -> (\w+)", out)
    assert checks == [("zerocopy", "OK"), ("usual", "OK")], out
    assert len(re.findall(r"replica pid \d+: private memory", out)) == 8, out


def test_hf_pipeline_example():
    out = run_example("hf_pipeline_ray_data.py", "--small")
    assert re.search(r"classified 64 rows with 2 actors; labels equal to the driver's pipeline: 64/64; .* -> OK", out), out


@pytest.mark.parametrize("quantize", ["torchao-int8", "bnb-nf4"])
def test_quantized_ray_data_example(quantize):
    out = run_example("quantized_ray_data.py", "--small", "--quantize", quantize)
    assert re.search(r"4 actors predicted 64 rows; equal to the driver's quantized model: 64/64 -> OK", out), out


def test_serve_lora_adapters_example():
    out = run_example("serve_lora_adapters.py", "--small")
    assert len(re.findall(r"2 replicas: logits equal to the driver's base \+ adapter: True; base weights shared "
                          r"\(zero-copy\): True -> OK", out)) == 2, out


def test_rl_weight_updates_example():
    out = run_example("rl_weight_updates.py", "--rollouts", "2", "--steps", "3")
    assert re.findall(r"step (\d): trainer \S+ rollouts \[.*\] -> (\w+)", out) == [("0", "OK"), ("1", "OK"), ("2", "OK")], out
