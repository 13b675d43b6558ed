"""In-place writes into zero-copy weights: they stay private to the writer (copy-on-write), never
reach another actor, never kill a worker; and what users do with a loaded model works."""

from __future__ import annotations

import copy
import gc
import logging
import operator

import numpy as np
import pytest
import ray
import torch
from torch import nn

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.testing import tensors_outside_shared_memory, zoo_input, zoo_model


class WritesWeight(nn.Module):
    """hard_cases plus an explicit in-place update of one of its tensors in every call."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.inner = zoo_model("hard_cases")
        self.target = target

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(ids)
        with torch.no_grad():
            operator.attrgetter(self.target)(self).add_(1)
        return out


@ray.remote(num_cpus=0.5)
class Holder:
    def __init__(self, ref, private_copy: bool = False) -> None:
        self.model = load_model_in_actor(ref, private_copy=private_copy)

    def run(self, ids: torch.Tensor, train: bool = False) -> torch.Tensor:
        self.model.train(train)
        with torch.no_grad():
            return self.model(ids)

    def tensor(self, name: str) -> torch.Tensor:
        return operator.attrgetter(name)(self.model).clone()

    def write(self, name: str) -> None:
        with torch.no_grad():
            operator.attrgetter(name)(self.model).add_(1)

    def anonymous_kb(self) -> int:
        return _anonymous_kb()


def _anonymous_kb() -> int:
    """This process's anonymous memory (a page written copy-on-write becomes anonymous)."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))


@pytest.mark.other_backends_slow  # (each case crashes and replaces a worker)
@pytest.mark.parametrize("target", ["inner.embed.weight", "inner.blocks.0.1.running_mean"])
def test_a_write_stays_private_to_the_writer(ray_local, backend, target):
    model = WritesWeight(target).eval()
    original = operator.attrgetter(target)(model).detach().clone()
    ref = prepare_model_for_actors(model, backend=backend)
    reader = load_model_in_actor(ref)  # the driver is a worker on this node too
    writer, other = Holder.remote(ref), Holder.remote(ref)
    for _ in range(3):
        ray.get(writer.run.remote(zoo_input()))
    assert torch.equal(ray.get(writer.tensor.remote(target)), original + 1 + 1 + 1)  # the writer sees its own writes
    assert torch.equal(ray.get(other.tensor.remote(target)), original)  # nobody else does
    assert torch.equal(operator.attrgetter(target)(reader), original)
    assert torch.equal(operator.attrgetter(target)(load_model_in_actor(ref)), original)  # a fresh load either


def test_batchnorm_in_train_mode_updates_only_its_own_statistics(ray_local):
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    ids = zoo_input()
    writer, other = Holder.remote(ref), Holder.remote(ref)
    expected = ray.get(other.run.remote(ids))
    ray.get(writer.run.remote(ids, train=True))
    stats = "blocks.0.1.running_mean"
    assert not torch.equal(ray.get(writer.tensor.remote(stats)), model.blocks[0][1].running_mean)
    assert torch.equal(ray.get(other.run.remote(ids)), expected)
    assert torch.equal(load_model_in_actor(ref).blocks[0][1].running_mean, model.blocks[0][1].running_mean)


def test_a_write_copies_only_the_pages_it_touches(ray_local):
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))  # 8 MiB of weights
    model[1].register_buffer("step", torch.zeros(1))
    ref = prepare_model_for_actors(model)
    actor = Holder.remote(ref)
    ray.get(actor.write.remote("1.bias"))  # (the method's first call allocates a little)
    before = ray.get(actor.anonymous_kb.remote())
    ray.get(actor.write.remote("1.step"))
    small = ray.get(actor.anonymous_kb.remote()) - before
    ray.get(actor.write.remote("0.weight"))
    big = ray.get(actor.anonymous_kb.remote()) - before
    assert small < 256, f"writing a 4-byte buffer made {small} KiB private"
    assert big >= 4000, f"writing a 4 MiB weight made only {big} KiB private: where did the write go?"
    assert torch.equal(load_model_in_actor(ref)[0].weight, model[0].weight)


def test_private_copy_is_a_copy_made_at_load(ray_local):
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    loaded = load_model_in_actor(ref, private_copy=True)
    shared = load_model_in_actor(ref)
    assert tensors_outside_shared_memory(shared) == []
    assert set(tensors_outside_shared_memory(loaded)) == {n for n, t in _unique(loaded) if t.nbytes}


def _unique(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    from ray_zerocopy.testing import unique_tensors

    return list(unique_tensors(model))


def test_two_loads_in_one_process_are_independent(ray_local):
    """Each load maps the weights copy-on-write on its own: a write through one never shows in another,
    also not in a later load that reuses the same addresses."""
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    first, second = load_model_in_actor(ref), load_model_in_actor(ref)
    with torch.no_grad():
        first.embed.weight.fill_(7)
    assert torch.equal(second.embed.weight, model.embed.weight)
    del first
    gc.collect()
    assert torch.equal(load_model_in_actor(ref).embed.weight, model.embed.weight)


def test_mappings_go_with_the_model(ray_local):
    ref = prepare_model_for_actors(zoo_model("hard_cases"))

    def private_maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if "plasma" in line and line.split()[1].endswith("p"))

    gc.collect()
    before = private_maps()
    models = [load_model_in_actor(ref) for _ in range(5)]
    assert private_maps() == before + 5
    del models
    gc.collect()
    assert private_maps() == before


# ---------------------------------------------------------------- what users do with a loaded model


@ray.remote(num_cpus=0.5)
class Trainer:
    """An actor that treats its loaded model as its own."""

    def __init__(self, ref) -> None:
        self.model = load_model_in_actor(ref)

    def operate(self, what: str) -> float:
        model = self.model
        if what == "load_state_dict":
            model.load_state_dict({k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()
                                   if v.is_floating_point()}, strict=False)
        elif what == "init":
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.weight)
        elif what == "optimizer":
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            model.train()
            model(zoo_input()).float().pow(2).mean().backward()
            opt.step()
            model.eval()
        with torch.no_grad():
            return float(model(zoo_input()).float().sum())


@pytest.mark.parametrize("what", ["load_state_dict", "init", "optimizer"])
def test_ordinary_operations_work_and_stay_private(ray_local, what):
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    with torch.no_grad():
        expected = float(model(zoo_input()).float().sum())
    assert ray.get(Trainer.remote(ref).operate.remote(what)) != expected  # it changed its own model
    assert ray.get(_forward_in_task.remote(ref)) == expected  # nobody else's
    reloaded = load_model_in_actor(ref)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


@ray.remote(num_cpus=0.5)
def _forward_in_task(ref) -> float:
    model = load_model_in_actor(ref)
    with torch.no_grad():
        model.embed.weight.mul_(2)  # a task's write stays in the task
    model = load_model_in_actor(ref)
    with torch.no_grad():
        return float(model(zoo_input()).float().sum())


def test_write_in_the_driver_stays_in_the_driver(ray_local):
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    loaded = load_model_in_actor(ref)
    nn.init.ones_(loaded.embed.weight)
    assert torch.equal(ray.get(Holder.remote(ref).tensor.remote("embed.weight")), model.embed.weight)


def test_save_deepcopy_script_and_trace_of_a_loaded_model(ray_local, tmp_path):
    """torch.save of the state dict (every dtype, BatchNorm's int64 counter among them), copy.deepcopy,
    torch.jit.script and torch.jit.trace: all work and give the original's outputs."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    model.register_buffer("mask", torch.ones(4, dtype=torch.bool))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    loaded = load_model_in_actor(prepare_model_for_actors(model))
    torch.save(loaded.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "sd.pt").stat().st_size < 2 * sum(v.nbytes for v in model.state_dict().values()) + 8192
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(state)
    for m in (fresh, copy.deepcopy(loaded), torch.jit.script(loaded), torch.jit.trace(loaded, x)):
        assert torch.equal(m(x), expected), type(m)


def test_dtype_on_cpu_is_a_private_copy_without_false_alarms(ray_local):
    model = zoo_model("hard_cases")
    loaded = load_model_in_actor(prepare_model_for_actors(model), dtype=torch.float64)
    with torch.no_grad():
        loaded.embed.weight.add_(1)
        loaded(zoo_input())
        loaded(zoo_input())
    assert loaded.embed.weight.dtype == torch.float64


def test_without_a_copy_on_write_mapping_a_load_copies_and_says_so(ray_local, monkeypatch, caplog):
    """Where the file behind Ray's store cannot be opened (a restricted /proc), a load takes a private
    copy and logs one line: correct, never shared writable memory."""
    from ray_zerocopy import _log, _shm

    monkeypatch.setattr(_shm, "_file_path", lambda vma: None)
    monkeypatch.setattr(_log, "_said", set())
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    with caplog.at_level(logging.WARNING, logger="ray_zerocopy"):
        loaded, again = load_model_in_actor(ref), load_model_in_actor(ref)
    lines = [r.getMessage() for r in caplog.records if "copy-on-write" in r.getMessage()]
    assert len(lines) == 1 and "private copy" in lines[0], lines
    with torch.no_grad():
        loaded.embed.weight.fill_(3)
    assert torch.equal(again.embed.weight, model.embed.weight)
    assert torch.equal(load_model_in_actor(ref).embed.weight, model.embed.weight)


# ---------------------------------------------------------------- a model that writes in its forward


def _phi3_longrope() -> nn.Module:
    """A tiny Phi-3 with LongRoPE (as Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): its rotary embedding
    copies a new ``inv_freq`` into its non-persistent buffer in place, in eval mode, on every forward."""
    from transformers import Phi3Config, Phi3ForCausalLM

    head_dim = 8
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                        original_max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0 + i / 10 for i in range(head_dim // 2)],
                                         "long_factor": [2.0 + i for i in range(head_dim // 2)],
                                         "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


@ray.remote(num_cpus=0.5)
def _phi3_logits(ref, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    model = load_model_in_actor(ref)
    with torch.no_grad():
        return [model(ids).logits for ids in inputs]


def test_phi3_longrope_writes_its_buffer_in_forward_and_works(ray_local, backend):
    model = _phi3_longrope()
    inputs = [torch.randint(3, 64, (1, 40)), torch.randint(3, 64, (1, 8))]  # long (> 16), then short again
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]
    ref = prepare_model_for_actors(model, backend=backend)
    got = ray.get(_phi3_logits.remote(ref, inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    untouched = load_model_in_actor(ref).model.rotary_emb.inv_freq
    assert torch.equal(untouched, _phi3_longrope().model.rotary_emb.inv_freq)


# ---------------------------------------------------------------- Ray Data


class WritingUDF:
    """A map_batches UDF that writes into its loaded weights on every batch."""

    def __init__(self, model_ref) -> None:
        self.model = load_model_in_actor(model_ref)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            self.model.embed.weight.mul_(0.99)
            out = self.model(torch.as_tensor(batch["ids"]))
        return {"row": batch["row"], "pred": out.argmax(-1).numpy()}


@pytest.mark.slow  # (a Ray Data job)
def test_ray_data_job_whose_udf_writes_completes(ray_local):
    from ray.data import ActorPoolStrategy

    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model)
    ids = np.random.default_rng(0).integers(0, 50, size=(64, 8))
    ds = ray.data.from_items([{"row": i, "ids": ids[i]} for i in range(64)])
    rows = ds.map_batches(WritingUDF, fn_constructor_kwargs={"model_ref": ref}, batch_size=8,
                          compute=ActorPoolStrategy(size=2), num_cpus=0.5).take_all()
    assert sorted(r["row"] for r in rows) == list(range(64))
    assert torch.equal(load_model_in_actor(ref).embed.weight, model.embed.weight)
