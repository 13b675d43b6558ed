"""Live weight updates on a GPU (issue 30): the new bytes are copied into the existing device tensors.

Marked ``gpu``: they skip where no CUDA device is visible and run on a GPU machine with a real Ray.
"""

from __future__ import annotations

import pytest
import ray
import torch

from ray_zerocopy import UpdateNotSupportedError, load_model_in_actor, prepare_model_for_actors, update_model_in_actor
from ray_zerocopy.testing import zoo_input, zoo_model


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

    def share_gpu_update(self, ref) -> str:
        try:
            update_model_in_actor(self.model, ref)
        except UpdateNotSupportedError as exc:
            return str(exc)
        return "no error"


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
    v1, v2 = zoo_model("hard_cases", seed=0).float(), zoo_model("hard_cases", seed=1).float()
    x = zoo_input().half()  # (the model runs in float16: so does its input)
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


@pytest.mark.gpu
def test_share_gpu_update_is_refused_with_a_typed_error(ray_gpu):
    v1 = zoo_model("hard_cases", seed=0)
    worker = GpuWorker.remote(prepare_model_for_actors(v1), share_gpu=True)
    try:
        message = ray.get(worker.share_gpu_update.remote(prepare_model_for_actors(zoo_model("hard_cases", seed=1))))
        out = ray.get(worker.run.remote(zoo_input()))
    finally:
        ray.kill(worker)
    assert "share_gpu=True" in message and "keeps its previous weights" in message
    assert torch.equal(out, ray.get(_reference.remote(v1, zoo_input())))
