"""Live weight updates on a GPU (issue 30): the new bytes are copied into the existing device tensors; with
``share_gpu=True`` every actor on the GPU moves onto one shared copy of the new version.

Marked ``gpu``: they skip where no CUDA device is visible and run on a GPU machine with a real Ray.
"""

from __future__ import annotations

import copy
import time

import pytest
import ray
import torch
from torch import nn

from ray_zerocopy import UpdateMismatchError, load_model_in_actor, prepare_model_for_actors, update_model_in_actor
from ray_zerocopy._detached import NAMESPACE
from ray_zerocopy.testing import zoo_input, zoo_model
from ray_zerocopy.testing.zoo import HardCases

GET_S = 180  # every ray.get waits at most this long (an update may start a holder: a process, seconds)


@pytest.fixture
def ray_gpu(ray_local):
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.fail(f"torch sees {torch.cuda.device_count()} CUDA device(s) but Ray reports no GPU")
    yield


@ray.remote(num_gpus=1)
class GpuWorker:
    def __init__(self, ref, **options):
        self.model = load_model_in_actor(ref, device="cuda", **options)

    def _tensors(self):
        return [*self.model.parameters(), *self.model.buffers()]

    def run(self, x):
        with torch.no_grad():
            return self.model(x.cuda()).cpu()

    def update(self, ref) -> dict:
        ptrs = [t.data_ptr() for t in self._tensors()]
        ids = [id(t) for t in self._tensors()]
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        update_model_in_actor(self.model, ref)
        return {"same_ptrs": ptrs == [t.data_ptr() for t in self._tensors()],
                "same_objects": ids == [id(t) for t in self._tensors()],
                "allocated_growth": torch.cuda.memory_allocated() - allocated,
                "dtypes": sorted({str(t.dtype) for t in self._tensors()})}

    def graph_replay_after_update(self, x, ref):
        """Capture the forward in a CUDA graph, update, replay: the graph reads the new weights."""
        static_x = x.cuda()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self.model(static_x)  # warm-up outside the graph, as CUDA graphs require
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self.model(static_x)
        update_model_in_actor(self.model, ref)
        graph.replay()
        torch.cuda.synchronize()
        return static_out.cpu()


@ray.remote(num_gpus=1)
def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.cuda()(x.cuda()).cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hard_cases", "gpt2"])
def test_gpu_update_copies_into_the_same_device_memory(ray_gpu, backend, name):
    v1, v2 = zoo_model(name, seed=0), zoo_model(name, seed=1)
    x = zoo_input()
    worker = GpuWorker.remote(prepare_model_for_actors(v1, backend=backend))
    try:
        rep = ray.get(worker.update.remote(prepare_model_for_actors(v2, backend=backend)))
        out = ray.get(worker.run.remote(x))
    finally:
        ray.kill(worker)
    assert rep["same_ptrs"] and rep["same_objects"]
    assert rep["allocated_growth"] <= 0, rep  # the staging copy is freed, nothing new stays allocated
    assert torch.equal(out, ray.get(_reference.remote(v2, x)))


@pytest.mark.gpu
def test_gpu_update_keeps_the_load_dtype(ray_gpu):
    v1, v2 = zoo_model("gpt2", seed=0), zoo_model("gpt2", seed=1)  # (hard_cases' forward adds float32 terms)
    x = zoo_input()
    worker = GpuWorker.remote(prepare_model_for_actors(v1), dtype=torch.float16)
    try:
        rep = ray.get(worker.update.remote(prepare_model_for_actors(v2)))
        out = ray.get(worker.run.remote(x))
    finally:
        ray.kill(worker)
    assert rep["same_ptrs"] and "torch.float32" not in rep["dtypes"]
    assert torch.equal(out, ray.get(_reference.remote(v2.half(), x)))


@pytest.mark.gpu
def test_cuda_graph_captured_before_an_update_replays_with_the_new_weights(ray_gpu):
    v1, v2 = zoo_model("gpt2", seed=0), zoo_model("gpt2", seed=1)
    x = zoo_input()
    worker = GpuWorker.remote(prepare_model_for_actors(v1))
    try:
        replayed = ray.get(worker.graph_replay_after_update.remote(x, prepare_model_for_actors(v2)))
    finally:
        ray.kill(worker)
    torch.testing.assert_close(replayed, ray.get(_reference.remote(v2, x)))


def _get(refs):
    return ray.get(refs, timeout=GET_S)


def _wait(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def _holders(*refs) -> list[str]:
    """The share_gpu holders alive for these refs (named ``rzc-<uid>-<GPU uuid>-<dtype>``)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    return sorted(n for n in names if any(n.startswith(f"rzc-{r.uid}-") for r in refs))


def _used_gpu_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def _on_gpu(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The driver's reference: the model's output computed on the GPU here (then freed)."""
    with torch.no_grad():
        out = copy.deepcopy(model).cuda()(x.cuda()).cpu()
    torch.cuda.empty_cache()
    return out


@ray.remote(num_gpus=0.25)  # (a quarter each: two share the one GPU, and the holders reserve none)
class Sharer:
    def __init__(self, ref):
        self.model = load_model_in_actor(ref, device="cuda", share_gpu=True)
        self.objects = [id(t) for t in [*self.model.parameters(), *self.model.buffers()]]

    def mapped(self, timeout_s: float) -> bool:
        """Whether the model maps a holder's copy (a first load starts on a copy of its own, and keeps it where
        mapping the holder's fails: then no holder holds the model)."""
        from ray_zerocopy import gpu_share, load

        wait_shared = getattr(gpu_share, "wait_shared", None) or load.wait_shared  # (moving to gpu_share.py)
        return wait_shared(self.model, timeout_s) and self.model in gpu_share._held

    def run(self, x):
        with torch.no_grad():
            return self.model(x.cuda()).cpu()

    def allocated(self) -> int:
        """Device bytes this process's allocator holds (a mapped shared copy is not among them)."""
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def update(self, ref) -> dict:
        ptrs = [p.data_ptr() for p in self.model.parameters() if p.numel()]
        update_model_in_actor(self.model, ref)
        return {"same_objects": self.objects == [id(t) for t in [*self.model.parameters(), *self.model.buffers()]],
                "moved": all(a != p.data_ptr() for a, p in zip(ptrs, [p for p in self.model.parameters() if p.numel()]))}


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["object_store", "packed"])  # (object_store: the empty tensor has a storage
def test_share_gpu_update_moves_every_actor_onto_one_copy_of_the_new_version(ray_gpu, store):  # of its own)
    """Two actors map one device copy; each updates (in parallel) and both map one copy of the new version (the
    old one goes), with its outputs; a refused update (another shape) changes nothing in either actor."""
    v1, v2 = zoo_model("hard_cases", seed=0), zoo_model("hard_cases", seed=1)
    x = zoo_input()
    want1, want2 = _on_gpu(v1, x), _on_gpu(v2, x)
    assert not torch.allclose(want1, want2, rtol=1e-2, atol=1e-2)  # (so the tolerance below tells them apart)
    ref1 = prepare_model_for_actors(v1, backend=store)
    ref2 = prepare_model_for_actors(v2, backend=store, like=ref1)
    torch.manual_seed(2)
    bad = prepare_model_for_actors(HardCases(vocab=999).eval(), backend=store)
    actors = [Sharer.remote(ref1) for _ in range(2)]
    try:
        assert all(_get([a.mapped.remote(GET_S / 2) for a in actors])), "a load did not map the holder's copy"
        for out in _get([a.run.remote(x) for a in actors]):
            torch.testing.assert_close(out, want1, rtol=1e-3, atol=1e-3)
        assert len(_holders(ref1)) == 1

        reports = _get([a.update.remote(ref2) for a in actors])
        assert all(r["same_objects"] and r["moved"] for r in reports), reports  # (a new copy: new addresses)
        assert all(_get([a.mapped.remote(0) for a in actors]))  # (held by the new version's holder)
        for out in _get([a.run.remote(x) for a in actors]):
            torch.testing.assert_close(out, want2, rtol=1e-3, atol=1e-3)
        assert _wait(lambda: _holders(ref1, ref2) == _holders(ref2) and len(_holders(ref2)) == 1), (
            f"expected only the new version's holder: {_holders(ref1, ref2)}")

        for refused in [a.update.remote(bad) for a in actors]:
            with pytest.raises(UpdateMismatchError, match="embed.weight"):
                _get(refused)
        for out in _get([a.run.remote(x) for a in actors]):
            torch.testing.assert_close(out, want2, rtol=1e-3, atol=1e-3)
        assert _wait(lambda: not _holders(bad)), f"the refused version's holder stayed: {_holders(bad)}"
        assert len(_holders(ref2)) == 1
    finally:
        for a in actors:
            ray.kill(a)
    assert _wait(lambda: not _holders(ref1, ref2, bad)), f"holders left after the actors died: {_holders(ref1, ref2)}"


@pytest.mark.gpu
def test_20_share_gpu_updates_keep_one_copy_on_the_gpu(ray_gpu):
    """20 updates in a row of two actors sharing a 256 MiB model: after each, the GPU holds at most one copy
    (and one holder process) more than after the load, until the old holder is gone; after all of them, the
    same as after the load. The actors never hold a copy of their own; outputs follow every version."""
    width, layers = 4096, 4

    def version(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()

    model = version(0)
    nbytes = sum(p.nbytes for p in model.parameters())
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    _used_gpu_bytes()  # (this process's CUDA context exists before the baseline)
    ref = prepare_model_for_actors(model, backend="packed")
    refs = [ref]
    actors = [Sharer.remote(ref) for _ in range(2)]
    try:
        assert all(_get([a.mapped.remote(GET_S / 2) for a in actors])), "a load did not map the holder's copy"
        with torch.no_grad():
            want = model(x)
        for out in _get([a.run.remote(x) for a in actors]):  # (also: the forward's own workspaces exist now)
            torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
        own = _get([a.allocated.remote() for a in actors])
        # (the forward's workspaces take about an eighth of this model; a private copy would be all of it)
        assert max(own) < nbytes / 4, f"an actor holds {max(own)} B of its own: it did not move onto the holder"
        assert _wait(lambda: len(_holders(*refs)) == 1)
        loaded = _used_gpu_bytes()
        one_more = nbytes + (1 << 30)  # a copy, and the CUDA context of the holder process that holds it
        for step in range(1, 21):
            model = version(step)
            ref = prepare_model_for_actors(model, backend="packed", like=ref)
            refs = [*refs[-1:], ref]  # (older refs dropped here: only their holders hold them)
            _get([a.update.remote(ref) for a in actors])
            with torch.no_grad():
                want = model(x)
            for out in _get([a.run.remote(x) for a in actors]):
                torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
            assert _wait(lambda: _used_gpu_bytes() <= loaded + one_more), (
                f"step {step}: {(_used_gpu_bytes() - loaded) / 2**20:.0f} MiB more than after the load "
                f"(a {nbytes / 2**20:.0f} MiB model)")
        assert _wait(lambda: _holders(*refs) == _holders(ref) and len(_holders(ref)) == 1), _holders(*refs)
        assert _wait(lambda: _used_gpu_bytes() <= loaded + (128 << 20)), (
            f"after 20 updates: {(_used_gpu_bytes() - loaded) / 2**20:.0f} MiB more than after the load")
        grown = [b - a for a, b in zip(own, _get([a.allocated.remote() for a in actors]))]
        assert max(grown) < nbytes / 8, f"the actors' own device memory grew {grown} B"
    finally:
        for a in actors:
            ray.kill(a)
