"""Live weight updates (issue 30): a loaded model takes a new version's weights in place.

Real Ray actors, real models (the zoo's hard cases and transformers models built from configs). GPU tests are
in test_update_gpu.py; Serve and the 100-update leak loop are slow (``-m slow``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import psutil
import pytest
import ray
import torch

from ray_zerocopy import (
    UpdateMismatchError,
    UpdateNotSupportedError,
    hold_weights,
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
    update_model_in_actor,
    update_pipeline_in_actor,
)
from ray_zerocopy.testing import tensors_outside_shared_memory, zoo_input, zoo_model
from ray_zerocopy.update import swap


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@ray.remote(num_cpus=0)
class Worker:
    """An actor that loads once and takes updates; it also holds the model's objects elsewhere (an
    optimizer, a forward hook, a list) to check that they keep working."""

    def __init__(self, ref, **options):
        self.model = load_model_in_actor(ref, **options)
        self.objects = [id(self.model)] + [id(t) for t in [*self.model.parameters(), *self.model.buffers()]]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.hook_calls = 0
        self.model.register_forward_hook(self._count)

    def _count(self, *args):
        self.hook_calls += 1

    def update(self, ref) -> float:
        start = time.perf_counter()
        update_model_in_actor(self.model, ref)
        return time.perf_counter() - start

    def run(self, x):
        return _outputs(self.model, x)

    def report(self) -> dict:
        now = [id(self.model)] + [id(t) for t in [*self.model.parameters(), *self.model.buffers()]]
        held = self.optimizer.param_groups[0]["params"]
        return {"same_objects": now == self.objects, "hook_calls": self.hook_calls,
                "optimizer_holds_model": all(a is b for a, b in zip(held, self.model.parameters())),
                "outside": sorted(tensors_outside_shared_memory(self.model)), "training": self.model.training,
                "uss": psutil.Process().memory_full_info().uss}


def _gpt2(seed: int, **config) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **config})).eval()


@pytest.fixture(scope="module")
def gpt2_worker(ray_session):
    """One actor holding GPT-2 version 0 for the tests below (an actor start costs seconds)."""
    v1 = _gpt2(0)
    ref = prepare_model_for_actors(v1)
    worker = Worker.remote(ref)
    yield worker, v1, ref
    ray.kill(worker)


def test_update_gives_the_new_outputs_and_keeps_every_object(gpt2_worker):
    worker, v1, ref1 = gpt2_worker
    v2 = _gpt2(1)
    x = zoo_input()
    assert torch.equal(ray.get(worker.run.remote(x)).logits, v1(x).logits)
    before = ray.get(worker.report.remote())
    ray.get(worker.update.remote(prepare_model_for_actors(v2)))
    assert torch.equal(ray.get(worker.run.remote(x)).logits, v2(x).logits)
    after = ray.get(worker.report.remote())
    ray.get(worker.update.remote(ref1))  # and back
    assert torch.equal(ray.get(worker.run.remote(x)).logits, v1(x).logits)
    assert after["same_objects"] and after["optimizer_holds_model"] and after["hook_calls"] == before["hook_calls"] + 1
    assert after["outside"] == before["outside"] == []  # the new weights are views of the shared store, as after a load
    assert not after["training"]


def test_update_of_a_torch_compile_wrapper_updates_the_module_it_holds(ray_local):
    """The zoo's hard cases (ties, a transposed parameter, BatchNorm and non-persistent buffers, fp16/bf16/int64/bool,
    a scalar, an empty tensor), loaded in this process and wrapped by torch.compile."""
    v1, v2 = zoo_model("hard_cases", seed=0), zoo_model("hard_cases", seed=1)
    model = load_model_in_actor(prepare_model_for_actors(v1))
    objects = [id(t) for t in [*model.parameters(), *model.buffers()]]
    wrapper = torch.compile(model, backend="eager")  # (the eager backend: no compiler run in the test)
    x = zoo_input()
    assert torch.equal(_outputs(wrapper, x), _outputs(v1, x))
    assert update_model_in_actor(wrapper, prepare_model_for_actors(v2)) is wrapper
    assert torch.equal(_outputs(wrapper, x), _outputs(v2, x))
    assert objects == [id(t) for t in [*model.parameters(), *model.buffers()]]
    assert model.heads["out"].weight is model.embed.weight
    assert model.transposed.stride() == v2.transposed.stride()


def test_refused_update_names_the_tensors_and_keeps_the_old_weights(gpt2_worker):
    worker, v1, _ = gpt2_worker
    x = zoo_input()
    bad = {
        "deeper": _gpt2(1, n_layer=3),
        "wider": _gpt2(1, n_positions=128),
        "half": _gpt2(1).half(),
        "untied": _gpt2(1, tie_word_embeddings=False),
    }
    messages = {}
    for kind, model in bad.items():
        with pytest.raises(UpdateMismatchError) as info:
            ray.get(worker.update.remote(prepare_model_for_actors(model)))
        messages[kind] = str(info.value)
        assert torch.equal(ray.get(worker.run.remote(x)).logits, v1(x).logits)  # the old weights, all of them
    report = ray.get(worker.report.remote())
    assert "in the new version but not in the loaded model: transformer.h.2.attn.c_attn.weight" in messages["deeper"]
    assert "transformer.wpe.weight: the loaded model has float32[64, 64], the new version float32[128, 64]" in (
        messages["wider"])
    assert "transformer.wte.weight: the loaded model has float32[512, 64], the new version float16[512, 64]" in (
        messages["half"])
    assert "lm_head.weight: the loaded model has tied to['transformer.wte.weight']" in messages["untied"]
    assert all("the model keeps its previous weights" in m and "Fix:" in m for m in messages.values())
    assert report["same_objects"]


@pytest.mark.unit
def test_a_swap_that_fails_midway_puts_back_what_it_swapped():
    a, b = torch.zeros(4), torch.zeros(4)
    old_a = a.data
    pairs = [("a", a, torch.ones(4)), ("b", b, torch.ones(4).to_sparse())]  # (set_data refuses a sparse tensor)
    with pytest.raises(RuntimeError):
        swap(pairs)
    assert a.data.data_ptr() == old_a.data_ptr() and torch.equal(a, torch.zeros(4))


class _Pipe:
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        shared = torch.nn.Linear(8, 8)
        self.encoder = torch.nn.Sequential(shared, torch.nn.ReLU())
        self.decoder = torch.nn.Sequential(shared, torch.nn.Linear(8, 4))  # shares a submodule with encoder
        self.head = torch.nn.Linear(4, 2)  # alone

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.decoder(self.encoder(x)))


def test_pipeline_update_updates_every_model_and_keeps_shared_submodules_shared(ray_local):
    skeleton, refs1 = rewrite_pipeline_for_actors(_Pipe(0))
    pipe = load_pipeline_in_actor(skeleton, refs1)
    weights = [id(p) for m in (pipe.encoder, pipe.decoder, pipe.head) for p in m.parameters()]
    x = torch.randn(3, 8)
    new = _Pipe(1)
    assert update_pipeline_in_actor(pipe, rewrite_pipeline_for_actors(new)[1]) is pipe
    assert torch.equal(pipe(x), new(x))
    assert pipe.encoder[0] is pipe.decoder[0]
    assert weights == [id(p) for m in (pipe.encoder, pipe.decoder, pipe.head) for p in m.parameters()]


def test_share_gpu_update_bookkeeping_with_a_fake_holder(ray_local, monkeypatch):
    """The share_gpu update path, run on the CPU (its GPU run: test_update_gpu.py): a fake holder per ref hands
    out tensors of that ref. The model is pointed at the new version's tensors (same objects, ties kept), the
    old holder is let go at once and the new one held (let go when the model is collected); a refused
    update, or one whose holder fails, changes nothing and keeps no new holder."""
    import gc

    from ray_zerocopy import gpu_share
    from ray_zerocopy._tensors import rebuild_model, weight_kinds
    from ray_zerocopy.guard import guard_model
    from ray_zerocopy.load import LoadOptions
    from ray_zerocopy.plugins import get_backend

    copies: dict[str, dict[str, torch.Tensor]] = {}
    released: list[tuple[str, bool]] = []

    def attached(ref, device, dtype):
        assert device == torch.device("cpu") and dtype is None
        if ref.uid == broken.uid:
            raise RuntimeError("the holder did not start")
        copies[ref.uid] = {k: t.clone() for k, t in get_backend(ref.backend).get(ref.payload, device).items()}
        return dict(copies[ref.uid]), ref.uid

    monkeypatch.setattr(gpu_share, "attached", attached)
    monkeypatch.setattr(gpu_share, "release", lambda holder, pid, linger=True: released.append((holder, linger)))
    v1, v2 = zoo_model("hard_cases", seed=0), zoo_model("hard_cases", seed=1)
    ref1, ref2 = prepare_model_for_actors(v1), prepare_model_for_actors(v2)
    broken = prepare_model_for_actors(zoo_model("hard_cases", seed=2))
    params = {name for name, is_param in weight_kinds(ref1.skeleton) if is_param}
    tensors = {k: t if k in params else t.clone() for k, t in attached(ref1, torch.device("cpu"), None)[0].items()}
    placed: list = []  # (the model as a share_gpu load builds it around the holder's tensors: buffers private)
    model = rebuild_model(ref1.skeleton, tensors, ref1.layouts, placed=placed)
    guard_model(model, [(n, t) for n, t in placed if n in params], restore=None)
    gpu_share.hold(model, ref1.uid)
    model.__dict__["_rzc_options"] = LoadOptions(share_gpu=True)
    objects = [id(t) for t in [*model.parameters(), *model.buffers()]]
    old_copy = {k: t.detach() for k, t in copies[ref1.uid].items()}  # (views of the old copy's memory)
    old_bytes = {k: t.clone() for k, t in old_copy.items()}
    x = zoo_input()

    update_model_in_actor(model, ref2)
    assert torch.equal(_outputs(model, x), _outputs(v2, x))
    assert objects == [id(t) for t in [*model.parameters(), *model.buffers()]]
    assert model.heads["out"].weight is model.embed.weight
    assert model.embed.weight.data_ptr() == copies[ref2.uid]["embed.weight"].data_ptr()  # (pointed, not copied)
    assert [k for k, t in old_copy.items() if not torch.equal(t, old_bytes[k])] == []  # the old copy: not written
    assert released == [(ref1.uid, False)]
    assert gpu_share._held[model].peek()[2][0] == ref2.uid
    assert vars(model)["_rzc_guard"].restore is not None

    with pytest.raises(UpdateMismatchError):
        update_model_in_actor(model, prepare_model_for_actors(zoo_model("hard_cases", seed=1).half()))
    assert released[1][1] is True and released[1][0] not in (ref1.uid, ref2.uid)  # its holder let go (it lingers)
    with pytest.raises(RuntimeError, match="the holder did not start"):
        update_model_in_actor(model, broken)
    assert len(released) == 2  # (nothing was counted by a holder that did not answer)
    assert torch.equal(_outputs(model, x), _outputs(v2, x))
    assert gpu_share._held[model].peek()[2][0] == ref2.uid

    del model
    gc.collect()
    assert released[2:] == [(ref2.uid, True)]


def test_share_gpu_update_of_a_model_prepared_with_others_is_refused(ray_local):
    """Models of a pipeline that share submodules map one device copy together (share_gpu): refused, unchanged."""
    skeleton, refs1 = rewrite_pipeline_for_actors(_Pipe(0))
    pipe = load_pipeline_in_actor(skeleton, refs1)
    pipe.encoder.__dict__["_rzc_guard"] = object()  # (as a share_gpu load leaves it)
    x = torch.randn(3, 8)
    before = pipe(x)
    with pytest.raises(UpdateNotSupportedError, match="prepared together"):
        update_pipeline_in_actor(pipe, rewrite_pipeline_for_actors(_Pipe(1))[1])
    assert torch.equal(pipe(x), before)


@pytest.mark.parametrize("hold", [True, False])
def test_hold_weights_keeps_one_version_inside_a_threaded_call(ray_local, hold):
    """Calls in threads next to updates (as in Ray Serve, which runs sync methods in a thread pool)."""
    refs = [prepare_model_for_actors(zoo_model("hard_cases", seed=s)) for s in (0, 1)]
    model = load_model_in_actor(refs[0])
    x = zoo_input()

    def call_twice() -> bool:
        with hold_weights(model) if hold else contextlib.nullcontext():
            first = _outputs(model, x)
            time.sleep(0.01)  # (an update lands here, unless the call holds the weights)
            return torch.equal(first, _outputs(model, x))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(call_twice) for _ in range(40)]
        for i in range(40):
            update_model_in_actor(model, refs[(i + 1) % 2])
            time.sleep(0.003)
        one_version = [c.result() for c in calls]
    if hold:
        assert all(one_version)
    else:  # (the control: the same calls without hold_weights do see a mix)
        assert not all(one_version)


def _store_mib(at_most: int | None = None) -> int:
    """MiB in this node's object store; with ``at_most``, once it is there (up to 10 s: Ray frees objects
    asynchronously, within a second of their last reference going)."""
    from ray._private.internal_api import memory_summary

    deadline = time.monotonic() + 10
    while True:
        line = next(x for x in memory_summary(ray.get_runtime_context().gcs_address, stats_only=True).splitlines()
                    if "Plasma memory usage" in x)
        used = int(line.split("Plasma memory usage")[1].split("MiB")[0])
        if at_most is None or used <= at_most or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


@pytest.mark.slow
def test_100_updates_grow_neither_the_store_nor_the_actors(ray_local):
    def version(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).eval()  # 32 MiB

    size_mib = 32
    base = _store_mib()
    ref = prepare_model_for_actors(version(0))
    workers = [Worker.remote(ref) for _ in range(2)]
    x = torch.randn(2, 1024)
    try:
        store, uss = {}, {}
        for step in range(1, 101):
            model = version(step)
            ref = prepare_model_for_actors(model)  # (the previous ref is dropped here: only actors hold it)
            ray.get([w.update.remote(ref) for w in workers])
            if step in (10, 100):
                assert all(torch.equal(o, _outputs(model, x)) for o in ray.get([w.run.remote(x) for w in workers]))
                store[step] = _store_mib(at_most=base + size_mib) - base
                uss[step] = [r["uss"] for r in ray.get([w.report.remote() for w in workers])]
    finally:
        for w in workers:
            ray.kill(w)
    assert store[100] <= size_mib + 1 and store[10] <= size_mib + 1, store  # the newest version only
    growth = [(b - a) / 2**20 for a, b in zip(uss[10], uss[100])]
    assert max(growth) < size_mib / 4, f"actor private memory grew {growth} MiB over 90 updates"


def test_like_puts_only_weights_and_refuses_another_architecture_in_the_driver(gpt2_worker, tmp_path):
    worker, v1, ref1 = gpt2_worker
    x = zoo_input()
    v2 = _gpt2(2)
    ref2 = prepare_model_for_actors(v2, like=ref1)
    assert ref2.skeleton is ref1.skeleton and ref2.uid != ref1.uid
    ray.get(worker.update.remote(ref2))
    assert torch.equal(ray.get(worker.run.remote(x)).logits, v2(x).logits)
    assert torch.equal(load_model_in_actor(ref2)(x).logits, v2(x).logits)  # a fresh load of it (a new replica)
    _gpt2(3).save_pretrained(tmp_path)  # a new checkpoint folder, as a trainer writes it
    from ray_zerocopy.hf import prepare_pretrained

    ray.get(worker.update.remote(prepare_pretrained(tmp_path, like=ref1)))
    assert torch.equal(ray.get(worker.run.remote(x)).logits, _gpt2(3)(x).logits)
    with pytest.raises(UpdateMismatchError) as info:
        prepare_model_for_actors(_gpt2(1, n_layer=3), like=ref1)
    assert "in the new version but not in the previous version (like=): transformer.h.2.ln_1.weight" in str(info.value)
    assert "nothing was stored" in str(info.value)
    ray.get(worker.update.remote(ref1))
