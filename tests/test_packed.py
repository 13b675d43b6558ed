"""The packed transport: one aligned contiguous buffer, one object, a validated index."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_zerocopy import PayloadError
from ray_zerocopy._tensors import split_model
from ray_zerocopy.backends import packed, safetensors_blob
from ray_zerocopy.testing import dtype_zoo, merged_mappings, zoo_model


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.unit
def test_layout_aligns_every_tensor_and_never_overlaps():
    weights = dtype_zoo()
    index, nbytes = packed.layout(weights)
    assert [e[0] for e in index] == list(weights)
    ends = 0
    for name, _, shape, offset, size in index:
        assert offset % packed.ALIGN == 0 and offset >= ends, name
        assert size == weights[name].nbytes and tuple(shape) == tuple(weights[name].shape)
        ends = offset + size
    assert ends <= nbytes and nbytes % packed.ALIGN == 0


@pytest.mark.unit
def test_pack_is_exact_deterministic_and_zero_padded():
    weights = dtype_zoo()
    index, nbytes = packed.layout(weights)
    buf = packed.pack(weights, index, nbytes)
    assert np.array_equal(buf, packed.pack(dtype_zoo(), index, nbytes))
    used = np.zeros(nbytes, bool)
    for name, _, _, offset, size in index:
        assert buf[offset : offset + size].tobytes() == bits(weights[name])
        used[offset : offset + size] = True
    assert not buf[~used].any()


@ray.remote
def _load_report(payload):
    from ray_zerocopy.plugins import get_backend

    tensors = get_backend("packed").get(payload, torch.device("cpu"))
    base = min(t.data_ptr() for t in tensors.values() if t.nbytes)
    maps = merged_mappings("plasma")
    return {
        "bits": {k: (t.dtype, tuple(t.shape), bits(t)) for k, t in tensors.items()},
        "relative": {k: t.data_ptr() - base for k, t in tensors.items() if t.nbytes},
        "aligned": all(t.data_ptr() % packed.ALIGN == 0 for t in tensors.values() if t.nbytes),
        "in_one_mapping": any(lo <= base and base + payload.nbytes <= hi for lo, hi in maps),
    }


def test_get_in_worker_views_one_shared_buffer_at_the_indexed_offsets(ray_local):
    weights = split_model(zoo_model("hard_cases")).weights
    payload = packed.PackedBackend().put(weights)
    stored = ray.get(payload.ref)  # one object: the whole buffer
    assert isinstance(stored, np.ndarray) and stored.dtype == np.uint8 and len(stored) == payload.nbytes
    got = ray.get(_load_report.remote(payload))
    assert got["bits"] == {k: (t.dtype, tuple(t.shape), bits(t)) for k, t in weights.items()}
    first = min(off for name, _, _, off, size in payload.index if size)
    assert got["relative"] == {name: off - first for name, _, _, off, size in payload.index if size}
    assert got["aligned"] and got["in_one_mapping"]


def test_empty_model_round_trips(ray_local):
    backend = packed.PackedBackend()
    assert backend.get(backend.put({}), torch.device("cpu")) == {}


@pytest.mark.parametrize("module, cls", [(packed, "PackedBackend"), (safetensors_blob, "SafetensorsBackend")])
def test_device_load_copies_the_whole_buffer_once(ray_local, monkeypatch, module, cls):
    """Single-buffer transports hand the whole buffer to buffer_to_device once, then slice views."""
    calls = []

    def spy(buf, device, **options):
        calls.append((buf.numel(), device))
        return buf.to(device)

    monkeypatch.setattr(module, "buffer_to_device", spy)
    weights = dtype_zoo()
    backend = getattr(module, cls)()
    payload = backend.put(weights)
    got = backend.get(payload, torch.device("meta"))  # a non-CPU device this machine has
    assert calls == [(payload.nbytes, torch.device("meta"))]
    assert {k: (t.device.type, t.dtype, t.shape) for k, t in got.items()} == \
        {k: ("meta", t.dtype, t.shape) for k, t in weights.items()}


# ---------------------------------------------------------------- validation

INDEX, NBYTES = packed.layout(dtype_zoo())


def with_entry(i: int, **change) -> tuple:
    fields = dict(zip(("name", "dtype", "shape", "offset", "size"), INDEX[i]))
    fields.update(change)
    return INDEX[:i] + (tuple(fields.values()),) + INDEX[i + 1 :]


@pytest.mark.unit
@pytest.mark.parametrize("index, words", [
    (with_entry(8, offset=NBYTES), "runs past"),
    (with_entry(8, offset=INDEX[8][3] + 4), "unaligned"),
    (with_entry(8, offset=-64), "unaligned"),
    (with_entry(8, size=INDEX[8][4] + 4), "does not match shape"),
    (with_entry(8, dtype="float31"), "unknown dtype"),
    (with_entry(8, dtype="Tensor"), "unknown dtype"),
    (with_entry(8, shape=(-1,)), "non-negative"),
    (with_entry(8, shape=[3]), "tuple of non-negative"),
])
def test_bad_index_raises_payload_error_naming_the_tensor(index, words):
    with pytest.raises(PayloadError, match=words) as info:
        packed.check_index(index, NBYTES)
    assert info.value.tensor == INDEX[8][0]


@pytest.mark.unit
@pytest.mark.parametrize("index", [list(INDEX), INDEX[:3] + (("x", "float32"),), INDEX[:2] + ((1, 2, 3, 4, 5),)])
def test_malformed_index_raises_payload_error(index):
    with pytest.raises(PayloadError):
        packed.check_index(index, NBYTES)


@pytest.mark.unit
@settings(max_examples=300, deadline=2000)
@given(st.integers(0, len(INDEX) - 1), st.sampled_from(["dtype", "shape", "offset", "size"]),
       st.one_of(st.none(), st.integers(-2**70, 2**70), st.text(max_size=6),
                 st.tuples(st.integers(-3, 2**40)), st.lists(st.integers(0, 9), max_size=3).map(tuple)))
def test_random_index_edits_raise_payload_error_or_stay_in_bounds(i, field, value):
    try:
        entries = packed.check_index(with_entry(i, **{field: value}), NBYTES)
    except PayloadError:
        return
    base = torch.zeros(NBYTES, dtype=torch.uint8)
    for name, dtype, shape, offset, size in entries:
        assert 0 <= offset and offset + size <= NBYTES, name
        assert base[offset : offset + size].view(dtype).view(shape).nbytes == size


def test_wrong_stored_object_raises_payload_error(ray_local):
    payload = packed.PackedBackend().put(dtype_zoo())
    for stored in (np.zeros(payload.nbytes - 64, np.uint8), np.zeros(payload.nbytes, np.float32), "bytes"):
        bad = packed.PackedPayload(ray.put(stored), payload.nbytes, payload.index)
        with pytest.raises(PayloadError, match=f"not the {payload.nbytes}-byte uint8 buffer"):
            packed.PackedBackend().get(bad, torch.device("cpu"))
