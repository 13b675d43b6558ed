"""Several actors on one GPU share one device copy: share_gpu=True, CUDA IPC, holder lifetimes.

The CUDA tests skip where no CUDA device is visible (CI has none) and run on a GPU machine with a
real Ray; the two-GPU test needs two. The CPU fallback test runs everywhere.
"""

from __future__ import annotations

import logging
import time
import types

import numpy as np
import pytest
import ray
import torch
from torch import nn

from ray_zerocopy import (
    SharedWeightWriteError,
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
)
from ray_zerocopy._cuda import ROUTE_ENV
from ray_zerocopy._detached import NAMESPACE

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
LAYERS, WIDTH = 16, 4096  # 16 x 64 MiB fp32 = 1 GiB of weights


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=i % 2 == 0) for i in range(LAYERS)]).eval()


def _used_gpu_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def _holders() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith("rzc-"))


@ray.remote(num_gpus=0.25)
class Sharer:
    def start_cuda(self) -> str:
        torch.zeros(1, device="cuda")
        from ray_zerocopy.gpu_share import gpu_uuid

        return gpu_uuid(torch.device("cuda", 0))

    def load(self, ref, share: bool = True, dtype: torch.dtype | None = None) -> float:
        t0 = time.perf_counter()
        self.model = load_model_in_actor(ref, device="cuda", share_gpu=share, dtype=dtype)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.cuda().to(next(self.model.parameters()).dtype)).float().cpu()

    def write(self, x: torch.Tensor) -> str:
        try:
            with torch.no_grad():
                self.model[0].weight.add_(1)  # an in-place write into the shared device copy...
                self.model(x.cuda())  # ...is caught after the next call
        except SharedWeightWriteError as exc:
            return str(exc)
        return "no error"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids.cuda()).logits.cpu()

    def load_second(self, ref) -> None:
        self.second = load_model_in_actor(ref, device="cuda", share_gpu=True)

    def run_second(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.second(x.cuda()).cpu()

    def allocated(self) -> int:
        """Device bytes this process's allocator holds (memory mapped from a holder is not among them)."""
        return torch.cuda.memory_allocated()

    def drop(self, attr: str = "model") -> None:
        setattr(self, attr, None)
        import gc

        gc.collect()


@pytest.fixture
def ray_gpu(ray_local):
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.fail(f"torch sees {GPUS} CUDA device(s) but Ray reports none")
    yield


def _wait(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def _stays(condition, duration_s: float) -> bool:
    """Whether ``condition`` holds throughout ``duration_s`` (checked every 0.1 s; False at its first miss)."""
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.1)
    return condition()


@pytest.mark.gpu
def test_four_actors_on_one_gpu_share_one_copy(ray_gpu, capsys):
    model = _big_model()
    nbytes = sum(p.nbytes for p in model.parameters())
    ref = prepare_model_for_actors(model, backend="packed")
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(1))
    base = _used_gpu_bytes()
    actors = [Sharer.remote() for _ in range(4)]
    try:
        _four_share(actors, ref, model, nbytes, x, capsys)
    finally:
        for a in actors:
            ray.kill(a)
    assert _wait(lambda: not _holders()), f"holder still alive after every user died: {_holders()}"
    assert _wait(lambda: _used_gpu_bytes() < base + (256 << 20)), (
        f"GPU memory not back: {(_used_gpu_bytes() - base) / 2**20:.0f} MiB above the start")


def _four_share(actors, ref, model, nbytes, x, capsys):
    uuids = ray.get([a.start_cuda.remote() for a in actors])
    assert len(set(uuids)) == 1, uuids  # num_gpus=0.25: Ray packs all four onto one GPU
    contexts = _used_gpu_bytes()
    first = ray.get(actors[0].load.remote(ref))  # its own copy at once, moved onto the holder's once that is up
    assert _wait(lambda: ray.get(actors[0].allocated.remote()) < nbytes / 8), "the first actor never moved"
    one = _used_gpu_bytes() - contexts
    later = ray.get([a.load.remote(ref) for a in actors[1:]])
    grown = _used_gpu_bytes() - contexts
    outs = ray.get([a.run.remote(x) for a in actors])
    with capsys.disabled():
        print(f"\n[share_gpu] {nbytes / 2**30:.2f} GiB model on one GPU, device memory beyond the actors' CUDA contexts "
              f"(the holder's included): 1 actor +{one / 2**30:.2f} GiB, 4 actors +{grown / 2**30:.2f} GiB; "
              f"first load {first:.3f} s (its own copy while the holder starts), later {[round(t, 3) for t in later]} s")
    assert len(_holders()) == 1
    assert grown < 2 * nbytes, f"4 sharing actors grew the GPU by {grown / 2**30:.2f} GiB for a {nbytes / 2**30:.2f} GiB model"
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(x), rtol=1e-3, atol=1e-3)

    ray.kill(actors[0])  # the actor that started the holder: the others keep their weights
    assert all(torch.equal(o, outs[0]) for o in ray.get([a.run.remote(x) for a in actors[1:]]))


@pytest.mark.gpu
def test_first_load_copies_at_once_then_moves_onto_the_holder(ray_gpu):
    """The first actor on a GPU does not wait seconds for the holder to start: it loads a copy of its own,
    and moves onto the holder's copy (freeing its own) once the holder is up; outputs never change."""
    model = _big_model()[:4]
    nbytes = sum(p.nbytes for p in model.parameters())
    ref = prepare_model_for_actors(model, backend="packed")
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(4))
    a = Sharer.remote()
    try:
        ray.get(a.start_cuda.remote())
        ray.get(a.load.remote(ref))
        own = ray.get(a.allocated.remote())
        before = ray.get(a.run.remote(x))
        assert own >= nbytes, f"{own} B allocated: the first load did not take a copy of its own"
        ran = ray.get(a.allocated.remote())  # (+ what the forward keeps: cuBLAS's workspace)
        assert _wait(lambda: ray.get(a.allocated.remote()) < ran - 0.9 * nbytes), "it never moved onto the holder's copy"
        assert torch.equal(ray.get(a.run.remote(x)), before), "outputs changed with the move"
        assert len(_holders()) == 1, _holders()
        with torch.no_grad():
            torch.testing.assert_close(before, model(x), rtol=1e-3, atol=1e-3)
    finally:
        ray.kill(a)
    assert _wait(lambda: not _holders())


def _copier(ref, uuid: str):
    try:
        return ray.get_actor(f"copier-{ref.uid}-{uuid}", namespace=NAMESPACE)
    except ValueError:
        return None


def _same_outputs_as(model: nn.Module, x: torch.Tensor, *actors) -> None:
    with torch.no_grad():
        expected = model(x)
    for a in actors:
        torch.testing.assert_close(ray.get(a.run.remote(x)), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_later_loads_on_a_gpu_are_filled_by_its_copier(ray_gpu, backend):
    """With the copier route, the first private load on a GPU starts the model's copier there; later loads
    get their bytes from it (one DMA from its pinned pages), with the same outputs; it goes after
    COPIER_LINGER_S."""
    from ray_zerocopy.gpu_copier import COPIER_LINGER_S

    model = _big_model()[:4]
    ref = prepare_model_for_actors(model, backend=backend)
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(5))
    opted_in = Sharer.options(runtime_env={"env_vars": {ROUTE_ENV: "copier"}})
    first, second = opted_in.remote(), opted_in.remote()
    try:
        uuid = ray.get(first.start_cuda.remote())
        ray.get(first.load.remote(ref, False))
        assert _wait(lambda: _copier(ref, uuid) is not None)
        copier = _copier(ref, uuid)
        copies = ray.get(copier.ready.remote())
        ray.get(second.load.remote(ref, False))
        one_buffer = backend != "fake_per_tensor"  # (that test transport copies tensor by tensor: no copier)
        assert ray.get(copier.ready.remote()) == copies + one_buffer, (copies, ray.get(copier.ready.remote()))
        _same_outputs_as(model, x, first, second)
    finally:
        for a in (first, second):
            ray.kill(a)
    assert _wait(lambda: _copier(ref, uuid) is None, COPIER_LINGER_S + 15)


@pytest.mark.gpu
def test_copiers_started_at_prepare_fill_first_loads(ray_gpu, backend):
    """``gpu_copiers=True``: prepare starts the model's copier on this GPU (no load needed, no route set),
    and a fresh actor's first load is filled by it (one DMA), with the same outputs; ``staged`` opts out."""
    from ray_zerocopy.gpu_copier import stop_copiers
    from ray_zerocopy.gpu_share import gpu_uuid

    model = _big_model()[:4]
    ref = prepare_model_for_actors(model, backend=backend, gpu_copiers=True)
    uuid = gpu_uuid(torch.device("cuda", 0))  # (this process sees the same GPU as Ray's only one)
    assert ref.gpu_copiers and _wait(lambda: _copier(ref, uuid) is not None), "prepare started no copier"
    copier = _copier(ref, uuid)
    assert ray.get(copier.ready.remote(), timeout=60) == 0
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(6))
    first, opted_out = Sharer.remote(), Sharer.options(runtime_env={"env_vars": {ROUTE_ENV: "staged"}}).remote()
    try:
        ray.get([first.start_cuda.remote(), opted_out.start_cuda.remote()])
        ray.get(first.load.remote(ref, False))
        one_buffer = backend != "fake_per_tensor"  # (that test transport copies tensor by tensor: no copier)
        assert ray.get(copier.ready.remote()) == one_buffer
        ray.get(opted_out.load.remote(ref, False))
        assert ray.get(copier.ready.remote()) == one_buffer
        _same_outputs_as(model, x, first, opted_out)
        ray.get(first.load.remote(ref, False, torch.float64))  # (the cast waits for the copier's fill)
        assert ray.get(copier.ready.remote()) == 2 * one_buffer
        _same_outputs_as(model, x, first)
    finally:
        for a in (first, opted_out):
            ray.kill(a)
    assert stop_copiers() == 2 * one_buffer and _copier(ref, uuid) is None


@pytest.mark.gpu
def test_copiers_exit_when_the_preparer_dies(ray_gpu):
    """A copier started by prepare leaves once the process that prepared the model (the weights' owner) is
    gone, not after its 300 s idle limit."""
    from ray_zerocopy.gpu_share import gpu_uuid

    @ray.remote(num_cpus=0)
    class Preparer:
        def prepare(self):
            return prepare_model_for_actors(_big_model()[:2], backend="packed", gpu_copiers=True)

    preparer = Preparer.remote()
    ref = ray.get(preparer.prepare.remote())
    uuid = gpu_uuid(torch.device("cuda", 0))
    assert _copier(ref, uuid) is not None, "prepare started no copier"
    ray.kill(preparer)
    assert _wait(lambda: _copier(ref, uuid) is None, 60), "the copier outlived the weights' owner"


@pytest.mark.gpu
def test_pipeline_gpu_copiers_start_one_per_model(ray_gpu):
    """``rewrite_pipeline_for_actors(..., gpu_copiers=True)``: prepare starts a copier for each of the
    pipeline's models, and the pipeline loads on the GPU through them."""
    from ray_zerocopy.gpu_copier import stop_copiers
    from ray_zerocopy.gpu_share import gpu_uuid

    torch.manual_seed(0)  # 16 MiB each (a copier fills loads of 8 MiB or more)
    pipe = types.SimpleNamespace(a=nn.Linear(2048, 2048), b=nn.Linear(2048, 2048))
    skeleton, refs = rewrite_pipeline_for_actors(pipe, backend="packed", gpu_copiers=True)
    uuid = gpu_uuid(torch.device("cuda", 0))
    assert refs["a"].uid != refs["b"].uid
    assert all(_copier(r, uuid) is not None for r in refs.values()), "prepare started no copier"

    @ray.remote(num_gpus=0.25)
    def run(skeleton, refs, x):
        loaded = load_pipeline_in_actor(skeleton, refs, device="cuda")
        with torch.no_grad():
            return loaded.b(loaded.a(x.cuda())).cpu()

    x = torch.randn(2, 2048)
    with torch.no_grad():
        want = pipe.b(pipe.a(x))
    assert torch.allclose(ray.get(run.remote(skeleton, refs, x)), want, atol=1e-4)
    assert stop_copiers() == 2


def test_gpu_copiers_without_a_usable_gpu_change_nothing(ray_local):
    """``gpu_copiers=True`` where no node has GPUs starts nothing, and loads work as without it (a model and
    a pipeline)."""
    from ray_zerocopy.gpu_copier import stop_copiers

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray has GPUs (the GPU test above covers it)")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    ref = prepare_model_for_actors(model, backend="packed", gpu_copiers=True)
    x = torch.randn(2, 64)

    @ray.remote
    def run(ref, x):
        return load_model_in_actor(ref)(x)

    pipe = types.SimpleNamespace(encoder=model, head=nn.Linear(8, 2), first=model[0])  # (shared parts: one group)
    skeleton, refs = rewrite_pipeline_for_actors(pipe, gpu_copiers=True)
    assert len({r.uid for r in refs.values()}) == 1 and all(r.gpu_copiers for r in refs.values())

    @ray.remote
    def run_pipeline(skeleton, refs, x):
        loaded = load_pipeline_in_actor(skeleton, refs)
        return loaded.head(loaded.encoder(x))

    with torch.no_grad():
        assert torch.equal(ray.get(run.remote(ref, x)), model(x))
        assert torch.equal(ray.get(run_pipeline.remote(skeleton, refs, x)), pipe.head(model(x)))
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("copier-")]
    assert stop_copiers() == 0


def test_weights_lost_once_their_owner_dies(ray_local):
    """A copier (GPU only) exits once its model's weights are gone: :func:`weights_lost` says so when the
    process that put them (here an actor; a driver whose job ended, in use) has died, and not before, also
    where the asking process holds them (a copier does: its ``ray.get`` of them still succeeds then)."""
    from ray_zerocopy.gpu_copier import weights_lost

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self) -> list:
            return [ray.put(np.ones(1 << 20, dtype=np.uint8))]  # (1 MiB: in the shared store)

    owner = Owner.remote()
    refs = ray.get(owner.put.remote())
    held = ray.get(refs)  # (held in this process's store mapping, as a copier holds its model's objects)
    assert not weights_lost(refs)
    ray.kill(owner)
    assert _wait(lambda: weights_lost(refs), 30), "the owner died but its objects still read as there"
    assert held[0].sum() == 1 << 20  # (the held pages stay readable: the copier unpins them before it lets go)


def test_store_ranges_cover_every_array_at_its_address(ray_local):
    """The copier's map of a model's objects in Ray's store: page-aligned, non-overlapping ranges of the
    store's file, each array inside one, at the address this process maps it (CPU: no CUDA needed)."""
    from ray_zerocopy._shm import vma_of
    from ray_zerocopy.gpu_copier import store_ranges
    from ray_zerocopy.model_ref import object_refs

    ref = prepare_model_for_actors(nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)]), backend="object_store")
    held = ray.get(list(object_refs(ref.payload)))
    ranges = store_ranges(held)
    assert ranges and all(lo % 4096 == 0 and hi % 4096 == 0 and addr % 4096 == 0 for _, lo, hi, addr in ranges)
    spans = sorted((key, lo, hi) for key, lo, hi, _ in ranges)
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:])), spans
    arrays = [np.frombuffer(a, dtype=np.uint8) for obj in held for a in (obj.values() if isinstance(obj, dict) else [obj])]
    arrays = [a for a in arrays if a.nbytes > 100_000]
    assert len(arrays) >= 4
    for arr in arrays:
        vma = vma_of(arr.ctypes.data)
        offset = vma.file[3] + arr.ctypes.data - vma.start
        inside = [(lo, addr) for key, lo, hi, addr in ranges if key == vma.file[:3] and lo <= offset < offset + arr.nbytes <= hi]
        assert len(inside) == 1 and inside[0][1] + offset - inside[0][0] == arr.ctypes.data


@pytest.mark.gpu
def test_private_copy_control_grows_by_the_model(ray_gpu):
    """The control for the test above: without share_gpu each actor copies the whole model."""
    model = _big_model()
    nbytes = sum(p.nbytes for p in model.parameters())
    ref = prepare_model_for_actors(model, backend="packed")
    actors = [Sharer.remote() for _ in range(2)]
    ray.get([a.start_cuda.remote() for a in actors])
    before = _used_gpu_bytes()
    ray.get([a.load.remote(ref, False) for a in actors])
    assert _used_gpu_bytes() - before > 1.9 * nbytes
    for a in actors:
        ray.kill(a)


@pytest.mark.gpu
def test_write_into_shared_copy_is_reported_and_undone(ray_gpu, backend):
    model = _big_model()[:2]
    ref = prepare_model_for_actors(model, backend=backend)
    x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(2))
    writer, reader = Sharer.remote(), Sharer.remote()
    ray.get([writer.load.remote(ref), reader.load.remote(ref)])
    before = ray.get(reader.run.remote(x))
    message = ray.get(writer.write.remote(x))
    assert "'0.weight'" in message and "private_copy=True" in message, message
    assert torch.equal(ray.get(reader.run.remote(x)), before)  # put back from the object store
    assert torch.equal(ray.get(writer.run.remote(x)), before)
    for a in (writer, reader):
        ray.kill(a)
    assert _wait(lambda: not _holders())


@pytest.mark.gpu
def test_a_write_before_the_move_is_reported_and_undone(ray_gpu):
    """A first actor writes into its own copy while the holder still starts: the error comes as for a shared
    copy, and the model then runs on the stored weights (the move does not keep or refuse the written copy)."""
    model = _big_model()[:2]
    ref = prepare_model_for_actors(model, backend="packed")
    x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(6))
    a = Sharer.remote()
    try:
        ray.get(a.load.remote(ref))  # its own copy: the holder was started now
        message = ray.get(a.write.remote(x))
        assert "'0.weight'" in message and "private_copy=True" in message, message
        with torch.no_grad():
            torch.testing.assert_close(ray.get(a.run.remote(x)), model(x), rtol=1e-3, atol=1e-3)
        assert ray.get(a.allocated.remote()) < 0.5 * sum(p.nbytes for p in model.parameters()), "it did not move"
    finally:
        ray.kill(a)
    assert _wait(lambda: not _holders())


@pytest.mark.gpu
def test_a_model_that_writes_a_buffer_in_forward_shares_its_parameters(ray_gpu):
    """Phi-3 LongRoPE copies a new inv_freq into its buffer on every forward: buffers are private to
    each actor, so it runs; the parameters stay shared (and guarded)."""
    from test_inplace import _phi3_longrope

    model = _phi3_longrope()
    ids = torch.randint(3, 64, (1, 40))
    ref = prepare_model_for_actors(model)
    actors = [Sharer.remote() for _ in range(2)]
    ray.get([a.load.remote(ref) for a in actors])
    model.cuda()
    with torch.no_grad():
        expected = model(ids.cuda()).logits.cpu()
    for a in actors:
        assert torch.allclose(ray.get(a.logits.remote(ids)), expected, atol=1e-5)
        assert torch.allclose(ray.get(a.logits.remote(ids[:, :8])), model(ids[:, :8].cuda()).logits.detach().cpu(), atol=1e-5)
        ray.kill(a)
    assert _wait(lambda: not _holders())


@pytest.mark.gpu
def test_holder_lives_while_any_model_maps_it_then_goes(ray_gpu):
    from ray_zerocopy.gpu_share import LINGER_S

    ref = prepare_model_for_actors(_big_model()[:2])
    x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3))
    a = Sharer.remote()
    ray.get([a.load.remote(ref), a.load_second.remote(ref)])  # two models of one process on one holder
    expected = ray.get(a.run.remote(x))
    ray.get(a.drop.remote("model"))  # one goes, the other still maps the memory
    assert _stays(lambda: len(_holders()) == 1, LINGER_S + 1.5)  # (past the holder's linger: one user is left)
    assert torch.equal(ray.get(a.run_second.remote(x)), expected)
    ray.get(a.drop.remote("second"))  # the actor lives on without any model
    assert _wait(lambda: not _holders())
    ray.kill(a)


class SharedPredictor:
    def __init__(self, ref):
        self.model = load_model_in_actor(ref, device="cuda", share_gpu=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.model(torch.as_tensor(batch["x"]).cuda()).cpu().numpy()
        return {"row": batch["row"], "out": out}


@pytest.mark.gpu
def test_ray_data_actor_pool_on_one_gpu(ray_gpu):
    model = _big_model()[:4]
    xs = np.random.default_rng(0).standard_normal((32, WIDTH)).astype(np.float32)
    ref = prepare_model_for_actors(model)
    ds = ray.data.from_items([{"row": i, "x": xs[i]} for i in range(len(xs))])
    rows = ds.map_batches(SharedPredictor, fn_constructor_kwargs={"ref": ref}, num_gpus=0.25,
                          compute=ray.data.ActorPoolStrategy(size=4), batch_size=4).take_all()
    assert sorted(r["row"] for r in rows) == list(range(len(xs)))
    got = np.stack([r["out"] for r in sorted(rows, key=lambda r: r["row"])])
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.as_tensor(xs)).numpy(), rtol=1e-3, atol=1e-3)
    assert _wait(lambda: not _holders())


@pytest.mark.gpu(count=2)
def test_actors_on_two_gpus_get_one_copy_per_gpu(ray_gpu):
    ref = prepare_model_for_actors(_big_model()[:2])
    actors = [Sharer.options(num_gpus=0.5).remote() for _ in range(4)]
    uuids = ray.get([a.start_cuda.remote() for a in actors])
    assert len(set(uuids)) == 2, uuids
    ray.get([a.load.remote(ref) for a in actors])
    holders = _holders()
    assert len(holders) == 2 and {u for u in uuids} == {next(u for u in uuids if u in h) for h in holders}
    for a in actors:
        ray.kill(a)
    assert _wait(lambda: not _holders())


def test_share_gpu_on_cpu_loads_shared_host_memory_with_one_log_line(ray_local, caplog, monkeypatch):
    from ray_zerocopy import _log

    monkeypatch.setattr(_log, "_said", set())  # as in a fresh process
    from ray_zerocopy.testing import tensors_outside_shared_memory

    ref = prepare_model_for_actors(nn.Linear(256, 256))  # (large enough for the shared store)
    with caplog.at_level(logging.WARNING, logger="ray_zerocopy"):
        a = load_model_in_actor(ref, share_gpu=True)
        b = load_model_in_actor(ref, share_gpu=True)
    assert tensors_outside_shared_memory(a) == tensors_outside_shared_memory(b) == []  # shared host memory
    assert sum("share_gpu=True has no effect on cpu" in r.getMessage() for r in caplog.records) == 1
