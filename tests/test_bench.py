"""Smoke tests of ``python -m ray_zerocopy bench``: a tiny model end to end, failures reported, bad options.

The benchmark starts its own Ray (and a second driver for Ray's zero-copy flag), so it runs in a
subprocess here, never inside the suite's Ray. No timing is asserted: speed and memory are the
benchmark's output, not its test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_zerocopy.bench import main, parse_options
from ray_zerocopy.plugins import backend_names, get_backend

ALTERNATIVES = ["classic", "ray_native", "ray_put", "torch_load", "torch_load_mmap", "safetensors_load_file"]


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "ray_zerocopy", "bench", "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_every_approach_runs_end_to_end_on_a_tiny_model(tmp_path: Path, fake_backend: str) -> None:
    png = tmp_path / "bench.png"
    proc, data = _bench(tmp_path, "--model", "tiny-gpt2", "--actors", "2", "--repeats", "2", "--fast-repeats", "0",
                        "--png", str(png))
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = [r["name"] for r in data["results"]]
    assert names == ["rzc:" + b for b in backend_names()] + ALTERNATIVES  # the fake test backend included
    meta = data["meta"]
    assert meta["actors"] == 2 and meta["model"] == "tiny-gpt2" and meta["model_bytes"] > 0
    for r in data["results"]:
        assert r["ok"], f"{r['name']}: {r['error']}"
        assert len(r["cold_s"]) == 2 and len(r["warm_s"]) == 4, r["name"]
        assert all(0 < t < 60 for t in r["cold_s"] + r["warm_s"]), r["name"]
        assert 0 < r["prepare_s"] < 600 and isinstance(r["driver_peak_rss_bytes"], int), r["name"]  # (0 B added: ours)
        assert len(r["actor_pss_added_bytes"]) == 2 and r["node_bytes"] > 0, r["name"]
        assert r["max_abs_diff"] == r["max_abs_diff"], f"{r['name']}: output is NaN"  # NaN != NaN
        if r["kind"] == "ours":
            assert r["max_abs_diff"] == 0.0, r["name"]
            if get_backend(r["name"][4:]).shared_memory_marker == "plasma":  # not a file-based third party
                assert r["store_bytes"] >= meta["model_bytes"], r["name"]  # the weights live in the store
        if r["kind"] == "disk":
            assert r["file_bytes"] >= meta["model_bytes"] and r["store_bytes"] == 0, r["name"]
    for name in names:
        assert name in proc.stdout  # the printed table has a row per approach
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_an_approach_that_cannot_handle_the_model_is_reported_not_dropped(tmp_path: Path) -> None:
    proc, data = _bench(tmp_path, "--model", "tiny-bert", "--dtype", "bfloat16", "--actors", "1", "--repeats", "1",
                        "--fast-repeats", "6", "--cold-rounds", "2", "--approaches", "rzc:object_store,classic")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours, classic = data["results"]
    assert ours["name"] == "rzc:object_store" and ours["ok"] and ours["max_abs_diff"] == 0.0
    assert len(ours["warm_s"]) == 6  # loads under 50 ms are repeated --fast-repeats times
    assert len(ours["cold_s"]) == 2  # one first load per fresh actor, in two rounds of one
    assert classic["name"] == "classic" and not classic["ok"]
    assert "BFloat16" in classic["error"]  # numpy has no bfloat16: the classic recipe's known limit
    assert "FAILED" in proc.stdout


@pytest.mark.slow
def test_a_quantized_model_is_compared_against_its_own_outputs(tmp_path: Path) -> None:
    """``--quantize``: the reference is the driver's quantized model itself (pickled as ray.put pickles it;
    torch.save failed on torchao's tensors), and every approach answers as it does."""
    proc, data = _bench(tmp_path, "--model", "tiny-bert", "--quantize", "torchao-int8", "--actors", "1",
                        "--repeats", "1", "--fast-repeats", "0", "--approaches", "rzc:object_store,ray_put")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in data["results"]:
        assert r["ok"] and r["max_abs_diff"] == 0.0, f"{r['name']}: {r['error']}"


@pytest.mark.slow
def test_together_loads_at_once_in_rounds(tmp_path: Path) -> None:
    """``--together`` end to end on the CPU (the GPU test below needs a GPU): first loads at once, reloads
    counted and timed together, the aggregate columns printed."""
    proc, data = _bench(tmp_path, "--model", "tiny-gpt2", "--actors", "3", "--together", "--repeats", "2",
                        "--fast-repeats", "0", "--approaches", "rzc:packed,ray_put")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in data["results"]:
        assert r["ok"], f"{r['name']}: {r['error']}"
        assert r["cold_together_actors"] == 3 and len(r["cold_s"]) == 3, r["name"]
        assert r["warm_together_loads"] == len(r["warm_s"]) == 6, r["name"]
        # a round lasts at least its slowest load: the rounds' sum, at least the slowest load of each
        assert r["warm_together_s"] >= max(r["warm_s"]) and r["together_warm_gbps"] > 0, r["name"]
    assert "last ready ms" in proc.stdout


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--hidden", "100"], "--hidden must be a positive multiple of 64 (heads of 64), got 100"),
        (["--approaches", "nope"], "unknown 'nope'"),
        (["--backends", "nope"], "unknown ['nope']"),
        (["--actors", "0"], "got 0"),
        (["--fast-repeats", "-1"], "--fast-repeats >= 0, got 4, 3, 1 and -1"),
        (["--cold-rounds", "0"], "got 4, 3, 0 and 20"),
        (["--device", "tpu"], "got 'tpu'"),
    ],
)
def test_bad_options_exit_2_naming_the_value(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.unit
def test_selection_keeps_table_order_and_expands_ours() -> None:
    opts = parse_options(["--approaches", "torch_load,ours,classic", "--backends", "object_store"])
    assert opts.approaches == ["rzc:object_store", "classic", "torch_load"]


CONTEXT_GROWTH = 160 << 20


@pytest.mark.gpu
@pytest.mark.parametrize("share_gpu", [False, True])
def test_four_actors_load_together_on_one_gpu(tmp_path: Path, share_gpu: bool) -> None:
    """``--device cuda --together``: 4 actors on one GPU (num_gpus=0.25) load at the same moment, private
    device copies or (``--share-gpu``) one shared copy; the aggregate figures are reported."""
    args = ["--model", "gpt2-small", "--dtype", "bfloat16", "--device", "cuda", "--actors", "4", "--together",
            "--approaches", "ours,ray_put", "--repeats", "2", "--fast-repeats", "0"]
    proc, data = _bench(tmp_path, *args, *(["--share-gpu"] if share_gpu else []))
    assert proc.returncode == 0, proc.stderr[-4000:]
    model_bytes = data["meta"]["model_bytes"]
    for r in data["results"]:
        assert r["ok"], f"{r['name']}: {r['error']}"
        assert r["cold_together_actors"] == 4 and r["together_cold_gbps"] > 0 and r["together_warm_gbps"] > 0, r
        if r["kind"] == "ours":
            assert r["max_abs_diff"] == 0.0, r["name"]
            # the holder's copy and its CUDA context (about 0.5 GiB), or four private copies; and each actor's
            # CUDA context grows during its first load (on the H200: 72 MB per actor for each of ours, 130 MB after
            # a forward), whatever the model's size; a second copy in every actor still fails
            limit = (2 * model_bytes + (1 << 30) if share_gpu else 4 * model_bytes) + 4 * CONTEXT_GROWTH
            assert model_bytes <= r["device_added_bytes"] < limit, (r["name"], r["device_added_bytes"], model_bytes)
    print(proc.stdout)
