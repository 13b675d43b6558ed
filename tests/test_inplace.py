"""In-place writes into zero-copy weights: refused or contained, never spread to other actors."""

from __future__ import annotations

import operator

import pytest
import ray
import torch
from torch import nn

from ray_zerocopy import SharedWeightWriteError, load_model_in_actor, prepare_model_for_actors
from ray_zerocopy.testing import zoo_input, zoo_model


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


def _outcome(actor, ids, **kw) -> str:
    try:
        ray.get(actor.run.remote(ids, **kw))
    except SharedWeightWriteError as exc:
        return f"typed: {exc}"
    except ray.exceptions.RayActorError:  # the write hit a read-only page: the writer died, nothing was written
        return "died"
    return "wrote"


@pytest.mark.parametrize("target", ["inner.embed.weight", "inner.blocks.0.1.running_mean"])
def test_explicit_write_never_reaches_other_actors(ray_local, backend, target, capsys):
    model = WritesWeight(target).eval()
    original = operator.attrgetter(target)(model).detach().clone()
    ref = prepare_model_for_actors(model, backend=backend)
    reader = load_model_in_actor(ref)  # the driver is a worker on this node too: its view is zero-copy
    outcome = _outcome(Holder.remote(ref), zoo_input())
    with capsys.disabled():
        print(f"\n[{backend}] in-place add_ on {target}: {outcome[:80]}")
    assert outcome != "wrote", "an in-place write into shared weights went through silently"
    if outcome.startswith("typed"):
        assert f"submodule {target.rpartition('.')[0]!r}" in outcome and repr(target) in outcome
        assert "private_copy=True" in outcome
    assert torch.equal(operator.attrgetter(target)(reader), original)
    assert torch.equal(operator.attrgetter(target)(load_model_in_actor(ref)), original)  # a fresh load too


def test_batchnorm_train_mode_refused_before_writing(ray_local, backend):
    model = zoo_model("hard_cases")
    ref = prepare_model_for_actors(model, backend=backend)
    ids = zoo_input()
    writer = Holder.remote(ref)
    expected = ray.get(writer.run.remote(ids))
    with pytest.raises(SharedWeightWriteError, match=r"'blocks\.0\.1' \(BatchNorm1d\) was called in train mode") as info:
        ray.get(writer.run.remote(ids, train=True))
    assert info.value.module == "blocks.0.1" and info.value.tensor == "blocks.0.1.running_mean"
    assert torch.equal(ray.get(writer.run.remote(ids)), expected)  # nothing was written: same output in eval mode
    reader = load_model_in_actor(ref)
    for name, t in model.state_dict().items():
        assert torch.equal(reader.state_dict()[name], t), name


def test_private_copy_lets_a_model_write(ray_local, backend):
    model = WritesWeight("inner.blocks.0.1.running_mean").eval()
    original = model.inner.blocks[0][1].running_mean.clone()
    ref = prepare_model_for_actors(model, backend=backend)
    ids = zoo_input()
    writer = Holder.remote(ref, private_copy=True)
    ray.get(writer.run.remote(ids))
    ray.get(writer.run.remote(ids, train=True))  # BatchNorm in train mode: allowed on a private copy
    assert not torch.equal(ray.get(writer.tensor.remote("inner.blocks.0.1.running_mean")), original)
    assert torch.equal(load_model_in_actor(ref).inner.blocks[0][1].running_mean, original)


@pytest.mark.parametrize("lookup", ["procmap_query", "maps_scan"])
def test_twin_follows_a_mapping_replaced_at_the_same_addresses(tmp_path, monkeypatch, lookup):
    """Ray unmaps a fallback allocation once unused and may map another file at the same addresses:
    the read-only twin of the old one must never serve its stale pages. Both ways of finding a
    mapping: the PROCMAP_QUERY ioctl (Linux 6.11+) and the scan of /proc/self/maps before it."""
    import ctypes
    import gc
    import mmap
    import os

    from ray_zerocopy import guard
    from ray_zerocopy.guard import readonly_storage

    if lookup == "maps_scan":
        monkeypatch.setattr(guard, "_query", [None])

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    size, marker = 4 * mmap.PAGESIZE, f"rzc-twin-test-{os.getpid()}"
    fds = []
    for letter in b"AB":
        path = f"/dev/shm/{marker}-{chr(letter)}" if os.path.isdir("/dev/shm") else str(tmp_path / f"{marker}-{letter}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, bytes([letter]) * size)
        os.unlink(path)
        fds.append(fd)
    shared, fixed = mmap.MAP_SHARED, 0x10  # MAP_FIXED: replace whatever is mapped there
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, shared, fds[0], 0)
    try:
        first = readonly_storage(addr + 64, 128, None, marker)
        assert first is not None and bytes(first) == b"A" * 128
        del first
        gc.collect()
        assert libc.mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE, shared | fixed, fds[1], 0) == addr
        second = readonly_storage(addr + 64, 128, None, marker)
        assert second is not None and bytes(second) == b"B" * 128  # not the stale "A" pages
        private = ctypes.create_string_buffer(4096)
        assert readonly_storage(ctypes.addressof(private), 4096, None, marker) is None  # not shared: no twin
    finally:
        libc.munmap(addr, size)
        for fd in fds:
            os.close(fd)


def test_version_check_names_module_and_tensor_where_pages_are_not_protected():
    """The fallback for memory that page protection cannot cover (or platforms without mprotect):
    a write is caught after the call, by version counter, naming the submodule and the tensor."""
    from ray_zerocopy.guard import guard_model

    model = guard_model(WritesWeight("inner.blocks.1.0.bias").eval())  # plain memory: no pages protected
    with pytest.raises(SharedWeightWriteError) as info:
        model(zoo_input())
    assert (info.value.module, info.value.module_type, info.value.tensor) == ("inner.blocks.1.0", "Linear",
                                                                            "inner.blocks.1.0.bias")
    assert "private_copy=True" in str(info.value)


def test_views_of_one_private_base_get_version_counters_of_their_own():
    """Views share their base's version counter: a write into one would be blamed on the first of them.
    readonly_views re-makes them on the same memory, each with its own counter."""
    from ray_zerocopy.guard import readonly_views

    base = torch.arange(12.0)
    out = readonly_views({"a": base[:6], "b": base[6:].view(2, 3), "alone": torch.ones(3)})
    assert [out[k].data_ptr() for k in "ab"] == [base.data_ptr(), base.data_ptr() + 24]
    assert torch.equal(out["b"], base[6:].view(2, 3))
    before = out["b"]._version
    out["a"].add_(1)
    assert out["b"]._version == before  # the write is traced to "a" only
    assert torch.equal(out["a"], base[:6]) and base[0] == 1  # same memory, no copy
