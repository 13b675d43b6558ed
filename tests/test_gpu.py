"""GPU loading: every transport onto the actor's own GPU, the fast host-to-device path, dtype=.

Tests marked ``gpu`` skip where no CUDA device is visible (CI has none); they run on a
GPU machine with a real Ray. The dtype tests at the end need no GPU and run everywhere.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import ray
import torch

from ray_zerocopy import (
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    quiet_readonly,
    rewrite_pipeline_for_actors,
)
from ray_zerocopy.errors import DeviceError, EnvVarError, LoadDtypeError
from ray_zerocopy.testing import unique_tensors, zoo_input, zoo_model


@pytest.fixture
def ray_gpu(ray_local):
    """The session's Ray, which must see the GPU (else num_gpus=1 actors would wait forever)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < 1:
        pytest.fail(f"torch sees {torch.cuda.device_count()} CUDA device(s) but Ray reports GPU={gpus}")
    yield


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(unique_tensors(model))


# ---------------------------------------------------------------- the host-to-device routes


def _store_buffer(nbytes: int) -> tuple[ray.ObjectRef, torch.Tensor]:
    """Random bytes in Ray's object store and a zero-copy tensor view of them (shared memory)."""
    ref = ray.put(np.frombuffer(np.random.default_rng(nbytes).bytes(nbytes), dtype=np.uint8))
    with quiet_readonly():
        return ref, torch.from_numpy(ray.get(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["auto", "copier", "staged", "plain"])  # (copier: no copier set here, so staged)
@pytest.mark.parametrize("nbytes", [0, 4099, (9 << 20) + 123, (37 << 20) + 5])
def test_copy_routes_are_byte_exact(ray_gpu, route, nbytes, caplog):
    """Small chunks and 3 threads: many chunks, odd sizes, a start that is not page-aligned."""
    from ray_zerocopy._cuda import copy_to_device

    ref, buf = _store_buffer(nbytes + 1)
    src = buf[1:]  # one byte in: the buffer no longer starts on a page (or Ray's 64-byte) boundary
    with caplog.at_level(logging.WARNING, logger="ray_zerocopy"):
        out = copy_to_device(src, torch.device("cuda"), route=route, threads=3, chunk_bytes=1 << 20)
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == src.shape
    assert torch.equal(out.cpu(), src)
    assert not caplog.records, "a fast route fell back on Ray's shared memory: " + caplog.text


@pytest.mark.gpu
def test_ring_that_cannot_be_pinned_falls_back_cleanly(ray_gpu, caplog, monkeypatch):
    """cudaHostRegister refuses the ring (here: a flag CUDA rejects): one log line, torch's pinned memory
    instead, an exact copy, and no CUDA error left behind."""
    from ray_zerocopy import _cuda, _log

    ref, buf = _store_buffer(64 << 20)
    monkeypatch.setattr(_cuda, "_PORTABLE", 1 << 30)  # not a cudaHostRegister flag: cudaErrorInvalidValue
    monkeypatch.setattr(_cuda, "_kept_ring", [])
    _log._said.clear()
    with caplog.at_level(logging.WARNING, logger="ray_zerocopy"):
        out = _cuda.copy_to_device(buf, torch.device("cuda"), route="staged", threads=4, chunk_bytes=4 << 20)
    assert torch.equal(out.cpu(), buf)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "pinning the staging buffers failed" in lines[0], lines
    assert _cuda._get_cudart().last_error() == 0
    assert torch.ones(8, device="cuda").mul(2).sum().item() == 16  # the next CUDA operation works


@pytest.mark.gpu
def test_staging_ring_is_kept_for_the_next_load_and_let_go_when_settings_change(ray_gpu):
    """The pinned staging ring stays pinned for the process's next copy (same settings: the same
    ring); other settings replace it, and the old one is unpinned."""
    from ray_zerocopy import _cuda

    ref, buf = _store_buffer(64 << 20)
    dev = torch.device("cuda")
    out = _cuda.copy_to_device(buf, dev, route="staged", threads=2, chunk_bytes=1 << 20)
    kept = _cuda._kept_ring[0]
    out2 = _cuda.copy_to_device(buf, dev, route="staged", threads=2, chunk_bytes=1 << 20)
    assert _cuda._kept_ring == [kept] and kept.shape == (4, 1 << 20)
    out3 = _cuda.copy_to_device(buf, dev, route="staged", threads=3, chunk_bytes=1 << 20)
    assert len(_cuda._kept_ring) == 1 and _cuda._kept_ring[0] is not kept
    assert torch.equal(out.cpu(), buf) and torch.equal(out2.cpu(), buf) and torch.equal(out3.cpu(), buf)
    cudart = _cuda._get_cudart()
    cudart.pin(kept.buf.data_ptr(), kept.buf.nbytes, flags=0)  # raises if the replaced ring were still pinned
    assert cudart.unregister(kept.buf.data_ptr()) == 0


@pytest.mark.unit
@pytest.mark.gpu
def test_copy_rejects_non_byte_buffers():
    from ray_zerocopy._cuda import copy_to_device

    with pytest.raises(ValueError, match="1-D uint8 CPU tensor"):
        copy_to_device(torch.zeros(4), torch.device("cuda"))
    with pytest.raises(EnvVarError, match="unknown host-to-device route 'fast'"):
        copy_to_device(torch.zeros(4, dtype=torch.uint8), torch.device("cuda"), route="fast")


# ---------------------------------------------------------------- models on the actor's GPU


@ray.remote(num_gpus=1)
class GpuLoader:
    """Loads in a num_gpus=1 actor; the reference is the earlier loaders' path: CPU load, then .to()."""

    def __init__(self, ref, dtype=None):
        self.dtype = dtype
        self.model = load_model_in_actor(ref, device="cuda", dtype=dtype)
        reference = load_model_in_actor(ref, private_copy=True).to("cuda")
        self.reference = reference.to(dtype) if dtype is not None else reference

    def report(self, ids: torch.Tensor) -> dict:
        m, r = self.model, self.reference
        state, ref_state = _state(m), _state(r)
        out = ref_out = None
        if self.dtype is None:  # the zoo model mixes dtypes on purpose: it runs only as stored
            with torch.no_grad():
                out, ref_out = m(ids.cuda()).cpu(), r(ids.cuda()).cpu()
        return {
            "names": sorted(state), "ref_names": sorted(ref_state),
            "devices": {str(t.device) for t in state.values()},
            "current": torch.cuda.current_device(),
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "dtypes": {k: t.dtype for k, t in state.items()}, "ref_dtypes": {k: t.dtype for k, t in ref_state.items()},
            "equal": [k for k in state if torch.equal(state[k].cpu(), ref_state[k].cpu())],
            "strides": {k: t.stride() for k, t in state.items()}, "ref_strides": {k: t.stride() for k, t in ref_state.items()},
            "oversized": [k for k, t in state.items() if t.untyped_storage().nbytes() > max(t.nbytes, 1)],
            "tied": m.heads["out"].weight is m.embed.weight,
            "buffers": {k: str(b.device) for k, b in m.named_buffers()},
            "out": out, "ref_out": ref_out,
        }

    def bad_device(self, ref) -> str:
        try:
            load_model_in_actor(ref, device="cuda:1")
        except DeviceError as exc:
            return str(exc)
        return "no error"


@pytest.mark.gpu
def test_every_backend_loads_onto_the_actors_gpu(ray_gpu, backend):
    """All dtypes, buffers (non-persistent too), ties, strides, on cuda:<the actor's own GPU>."""
    ref = prepare_model_for_actors(zoo_model("hard_cases"), backend=backend)
    actor = GpuLoader.remote(ref)
    try:
        rep = ray.get(actor.report.remote(zoo_input()))
        bad = ray.get(actor.bad_device.remote(ref))
    finally:
        ray.kill(actor)
    assert rep["names"] == rep["ref_names"]
    assert rep["devices"] == {f"cuda:{rep['current']}"}, rep["devices"]
    assert rep["cvd"] == ",".join(rep["gpu_ids"]) and len(rep["gpu_ids"]) == 1  # Ray's pick, seen as cuda:0
    assert set(rep["equal"]) == set(rep["names"])  # bit for bit, every dtype
    assert rep["dtypes"] == rep["ref_dtypes"] and {torch.float16, torch.bfloat16, torch.int64, torch.bool} <= set(
        rep["dtypes"].values())
    assert rep["strides"] == rep["ref_strides"]  # the transposed parameter keeps its layout
    assert rep["tied"]
    assert set(rep["buffers"].values()) == {"cuda:0"} and "positions" in rep["buffers"]
    assert torch.equal(rep["out"], rep["ref_out"])
    assert "cuda:1" in bad and "CUDA_VISIBLE_DEVICES" in bad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_converts_on_the_gpu(ray_gpu, backend, dtype):
    """Stored float32: floating tensors arrive as `dtype`, integers and bools untouched, ties kept,
    and no converted tensor keeps the transport's raw device buffer alive."""
    ref = prepare_model_for_actors(zoo_model("hard_cases").float(), backend=backend)
    actor = GpuLoader.remote(ref, dtype)
    try:
        rep = ray.get(actor.report.remote(zoo_input()))
    finally:
        ray.kill(actor)
    floats = {k for k, d in rep["ref_dtypes"].items() if d.is_floating_point}
    assert floats and all(rep["dtypes"][k] == dtype for k in floats)
    assert rep["dtypes"] == rep["ref_dtypes"]
    assert set(rep["equal"]) == set(rep["names"])  # the same values as model.to(dtype)
    assert rep["tied"] and rep["devices"] == {"cuda:0"}
    assert rep["oversized"] == []


class GpuPredictor:
    """A Ray Data actor: loads onto its own GPU once, predicts every batch."""

    def __init__(self, ref):
        self.model = load_model_in_actor(ref, device="cuda")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.model(torch.as_tensor(batch["ids"]).cuda()).cpu().numpy()
        dev = {str(p.device) for p in self.model.parameters()}
        return {"row": batch["row"], "out": out, "device": np.array([",".join(dev)] * len(out))}


@ray.remote(num_gpus=1)
def _reference_outputs(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.cuda()(torch.as_tensor(ids).cuda()).cpu().numpy()


@pytest.mark.gpu
def test_ray_data_map_batches_with_gpu_actors(ray_gpu, backend):
    model = zoo_model("hard_cases")
    ids = np.random.default_rng(0).integers(0, 50, size=(24, 8))
    ref = prepare_model_for_actors(model, backend=backend)
    ds = ray.data.from_items([{"row": i, "ids": ids[i]} for i in range(len(ids))])
    rows = ds.map_batches(
        GpuPredictor, fn_constructor_kwargs={"ref": ref}, num_gpus=1, concurrency=1, batch_size=8
    ).take_all()
    assert sorted(r["row"] for r in rows) == list(range(len(ids)))
    assert {r["device"] for r in rows} == {"cuda:0"}
    expected = ray.get(_reference_outputs.remote(model, ids))
    got = np.stack([r["out"] for r in sorted(rows, key=lambda r: r["row"])])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- dtype= without a GPU


def test_dtype_on_cpu_converts_floats_keeps_ties(ray_local):
    """(The conversion happens after the backend's get, the same code for every backend.)"""
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    loaded = load_model_in_actor(ref, dtype=torch.bfloat16)
    expected = _state(model)
    for name, t in _state(loaded).items():
        want = expected[name].to(torch.bfloat16) if expected[name].is_floating_point() else expected[name]
        assert t.dtype == want.dtype and torch.equal(t, want), name
    assert loaded.heads["out"].weight is loaded.embed.weight


def test_dtype_on_pipeline(ray_local):
    class Pipe:
        def __init__(self):
            self.a = zoo_model("hard_cases", seed=1)
            self.b = self.a  # one model under two names: loaded (and converted) once

    skeleton, refs = rewrite_pipeline_for_actors(Pipe(), backend="packed")
    pipe = load_pipeline_in_actor(skeleton, refs, dtype=torch.float16)
    assert pipe.a is pipe.b and pipe.a.embed.weight.dtype == torch.float16
    assert pipe.a.mask.dtype == torch.bool


@pytest.mark.parametrize("bad", [torch.int8, "float16", torch.bool])
def test_bad_dtype_is_refused_before_loading(ray_local, bad):
    ref = prepare_model_for_actors(torch.nn.Linear(2, 2))
    with pytest.raises(LoadDtypeError, match="floating-point torch.dtype") as info:
        load_model_in_actor(ref, dtype=bad)
    assert info.value.dtype == bad


def test_pending_copier_fills_end_before_any_torch_call_and_with_their_block():
    """A load's copier fill may run while the model is rebuilt (views only): it is waited for at the first torch
    call in that window (a module's own ``__setstate__`` reading its weights), else at the end of the load's
    block, also on an error."""
    from ray_zerocopy import _cuda

    order: list[str] = []

    def pending(name: str) -> tuple:
        return (lambda: order.append(name) or True), None, None  # (True: the copier made it)

    with _cuda.copy_source(lambda buf, dst: None):
        fills = _cuda._source.get()[1]
        fills.append(pending("fill 1"))
        with _cuda.finished_before_torch_calls():
            order.append("rebuilt")
            torch.zeros(2).sum()  # waits for the fill first
            order.append("read")
        fills.append(pending("fill 2"))
    with pytest.raises(RuntimeError), _cuda.copy_source(lambda buf, dst: None):
        _cuda._source.get()[1].append(pending("fill 3"))
        raise RuntimeError("the rebuild failed")
    assert order == ["rebuilt", "fill 1", "read", "fill 2", "fill 3"]
    with _cuda.finished_before_torch_calls():  # (outside a load: nothing to wait for, no mode)
        assert torch.zeros(1).sum().item() == 0
