"""The safetensors transport: the blob is what safetensors writes, and the reader validates before viewing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from ray_zerocopy import PayloadError, UnsupportedModelError
from ray_zerocopy._tensors import split_model
from ray_zerocopy.actor import prepare_model_for_actors
from ray_zerocopy.backends import safetensors_blob as sb
from ray_zerocopy.testing import dtype_zoo, zoo_model

# every dtype safetensors and torch share (F8_E8M0 too: safetensors 0.8 writes it, but its torch loader can't read it)
SHARED = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
          torch.uint64, torch.complex64, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@st.composite
def tensor_dicts(draw, dtypes=SHARED):
    names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                          min_size=0, max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(dtypes))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = draw(st.binary(min_size=n, max_size=n))
        out[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else \
            torch.empty(shape, dtype=dtype)
    return out


@pytest.mark.unit
@settings(max_examples=150, deadline=None)
@given(tensor_dicts())
def test_safetensors_reads_the_blob_as_what_it_writes_plus_padding(tensors):
    """safetensors' own reader reads every tensor byte for byte; the only extra entries are the zero padding
    tensors that align the next tensor."""
    blob = bytes(sb.write_blob(tensors))
    loaded = load(blob)
    pads = {k: t for k, t in loaded.items() if k.startswith(sb.PAD)}
    assert {k: (t.dtype, t.shape, bits(t)) for k, t in loaded.items() if k not in pads} == \
        {k: (t.dtype, t.shape, bits(t)) for k, t in tensors.items()}
    assert all(t.dtype == torch.uint8 and not t.any() and 0 < t.numel() < 64 for t in pads.values())


@pytest.mark.unit
def test_blob_of_real_model_weights_is_loadable_and_64_byte_aligned():
    weights = split_model(zoo_model("hard_cases")).weights
    blob = sb.write_blob(weights)
    loaded = load(bytes(blob))
    assert {k for k in loaded if not k.startswith(sb.PAD)} == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    start, entries = sb.parse_blob(blob)
    assert start % 64 == 0 and {e[0] for e in entries} == weights.keys()  # the padding is not a weight
    assert all(begin % 64 == 0 for _, _, _, begin, end in entries if end > begin)


@pytest.mark.unit
def test_a_tensor_named_like_the_padding_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"begins with '__ray_zerocopy_pad__\.'.*Fix: rename it"):
        sb.write_blob({f"{sb.PAD}0": torch.zeros(3)})


@pytest.mark.unit
def test_safetensors_load_reads_every_shared_dtype():
    tensors = dtype_zoo() | {str(d): torch.zeros(3, dtype=d) for d in SHARED}
    loaded = load(bytes(sb.write_blob(tensors)))
    assert {k: (t.dtype, t.shape, bits(t)) for k, t in loaded.items() if not k.startswith(sb.PAD)} == \
        {k: (t.dtype, t.shape, bits(t)) for k, t in tensors.items()}


@pytest.mark.unit
@settings(max_examples=100, deadline=None)
@given(tensor_dicts(SHARED + [torch.float8_e8m0fnu]))
def test_views_are_aligned_in_place_and_exact(tensors):
    blob = sb.write_blob(tensors)
    start, entries = sb.parse_blob(blob)
    base = torch.from_numpy(blob)
    got = sb.views(base, start, entries)
    assert {k: (t.dtype, t.shape, bits(t)) for k, t in got.items()} == \
        {k: (t.dtype, t.shape, bits(t)) for k, t in tensors.items()}
    lo, hi = base.data_ptr(), base.data_ptr() + len(blob)
    for t in got.values():
        if t.nbytes:  # a view of the blob itself (no copy), aligned for its dtype
            assert lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi
            assert (t.data_ptr() - lo) % 64 == 0


@pytest.mark.unit
def test_header_is_padded_so_the_data_starts_64_byte_aligned():
    blob = sb.write_blob({"a": torch.zeros(1, dtype=torch.int8), "b": torch.zeros(1, dtype=torch.float64)})
    n = int.from_bytes(bytes(blob[:8]), "little")
    assert (8 + n) % 64 == 0 and bytes(blob[8 : 8 + n]).endswith(b" ")


# ---------------------------------------------------------------- validation


def blob_with_header(header: dict, data: bytes, pad: bool = True) -> np.ndarray:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8 if pad else 0)
    return np.frombuffer(len(raw).to_bytes(8, "little") + raw + data, dtype=np.uint8).copy()


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.unit
@pytest.mark.parametrize("header, data, tensor, words", [
    ({"w": entry(offsets=(0, 16))}, bytes(8), "w", "outside the data section"),
    ({"w": entry(offsets=(4, 2))}, bytes(8), "w", "outside the data section"),
    ({"w": entry(offsets=(-8, 0))}, bytes(8), "w", "outside the data section"),
    ({"w": entry(shape=(3,))}, bytes(8), "w", "needs 12"),
    ({"w": entry(dtype="F31")}, bytes(8), "w", "unknown dtype"),
    ({"w": entry(shape=(-2,))}, bytes(8), "w", "non-negative"),
    ({"w": entry(shape=(2.0,))}, bytes(8), "w", "non-negative"),
    ({"w": entry(shape=(True, 2))}, bytes(8), "w", "non-negative"),
    ({"w": entry(offsets=(0,))}, bytes(8), "w", "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "w", "dtype, shape, data_offsets"),
    ({"w": "x"}, bytes(8), "w", "must be an object"),
    ({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12), "b", "overlaps"),
    ({"a": entry(), "b": entry(offsets=(12, 20))}, bytes(20), "b", "hole"),
    ({"a": entry()}, bytes(12), None, "data section holds 12"),
    ({"w": entry(shape=(2**40, 2**40))}, bytes(8), "w", "needs"),
])
def test_bad_header_raises_payload_error_naming_the_tensor(header, data, tensor, words):
    with pytest.raises(PayloadError, match=words) as info:
        sb.parse_blob(blob_with_header(header, data))
    assert info.value.tensor == tensor


@pytest.mark.unit
@pytest.mark.parametrize("blob, words", [
    (np.zeros(5, np.uint8), "shorter than"),
    (np.frombuffer((10**12).to_bytes(8, "little") + b"{}", np.uint8), "header length"),
    (np.frombuffer((1).to_bytes(8, "little") + b"{", np.uint8), "header length"),
    (np.frombuffer((8).to_bytes(8, "little") + b"[1,2,3] ", np.uint8), "JSON object"),
    (np.frombuffer((8).to_bytes(8, "little") + b"{\xff\xfe}    ", np.uint8), "UTF-8 JSON"),
    (np.frombuffer((8).to_bytes(8, "little") + b"{'a':1} ", np.uint8), "UTF-8 JSON"),
    (np.frombuffer((1000).to_bytes(8, "little") + b"[" * 1000, np.uint8), "UTF-8 JSON"),
])
def test_bad_blob_raises_payload_error(blob, words):
    with pytest.raises(PayloadError, match=words):
        sb.parse_blob(blob)


@pytest.mark.unit
def test_duplicate_name_is_rejected():
    raw = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw += b" " * (-len(raw) % 8)
    with pytest.raises(PayloadError, match="twice") as info:
        sb.parse_blob(np.frombuffer(len(raw).to_bytes(8, "little") + raw + b"\0", np.uint8))
    assert info.value.tensor == "w"


@pytest.mark.unit
def test_unpadded_foreign_header_is_rejected_not_misviewed():
    blob = blob_with_header({"w": entry()}, bytes(8), pad=False)
    assert (8 + int.from_bytes(bytes(blob[:8]), "little")) % 4  # the data section starts unaligned
    with pytest.raises(PayloadError, match="not aligned to 4 bytes") as info:
        sb.parse_blob(blob)
    assert info.value.tensor == "w"


@pytest.mark.unit
def test_metadata_is_ignored_and_reserved():
    blob = blob_with_header({"__metadata__": {"format": "pt"}, "w": entry()}, bytes(8))
    assert [e[0] for e in sb.parse_blob(blob)[1]] == ["w"]
    with pytest.raises(UnsupportedModelError, match="__metadata__"):
        sb.write_blob({"__metadata__": torch.zeros(1)})


def check_parse_is_safe(blob: np.ndarray) -> None:
    """Parsing either raises PayloadError or yields views that lie inside the blob and fit their shapes."""
    try:
        start, entries = sb.parse_blob(blob)
    except PayloadError:
        return
    base = torch.from_numpy(blob)
    for name, t in sb.views(base, start, entries).items():
        if t.nbytes:
            assert base.data_ptr() <= t.data_ptr() and t.data_ptr() + t.nbytes <= base.data_ptr() + len(blob), name


GOOD = sb.write_blob(dtype_zoo())
HEADER_END = 8 + int.from_bytes(bytes(GOOD[:8]), "little")


@pytest.mark.unit
@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_header_corruption_never_crashes(flips):
    blob = GOOD.copy()
    for pos, value in flips:
        blob[pos] = value
    check_parse_is_safe(blob)


@pytest.mark.unit
@settings(max_examples=200, deadline=2000)
@given(st.integers(0, len(GOOD) - 1))
def test_truncation_raises_payload_error(length):
    with pytest.raises(PayloadError):
        sb.parse_blob(GOOD[:length].copy())


@pytest.mark.unit
@settings(max_examples=300, deadline=2000)
@given(st.data())
def test_random_header_edits_never_crash(data):
    header = json.loads(bytes(GOOD[8:HEADER_END]))
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=5),
                     st.lists(st.integers(-5, 2**66), max_size=4), st.dictionaries(st.text(max_size=3), st.integers()))
    if field is None:
        header[name] = data.draw(junk)
    else:
        header[name][field] = data.draw(junk)
    tail = bytes(GOOD[HEADER_END:])
    check_parse_is_safe(blob_with_header(header, tail, pad=data.draw(st.booleans())))


# ---------------------------------------------------------------- through Ray


@ray.remote
def _get(payload):
    from ray_zerocopy.plugins import get_backend

    return {k: bits(t) for k, t in get_backend("safetensors").get(payload, torch.device("cpu")).items()}


def test_tampered_blob_in_object_store_raises_payload_error_in_worker(ray_local):
    blob = GOOD.copy()
    header = bytes(blob[8:HEADER_END]).replace(b'"data_offsets":[0,', b'"data_offsets":[8,', 1)
    blob[8:HEADER_END] = np.frombuffer(header, np.uint8)
    with pytest.raises(PayloadError, match="holds 96 bytes but shape") as info:  # [8,104] for 13 x I64
        ray.get(_get.remote(sb.SafetensorsPayload(ray.put(blob), len(blob))))
    assert info.value.tensor == "int64"
    with pytest.raises(PayloadError, match=f"not the {len(GOOD)}-byte uint8 blob"):
        ray.get(_get.remote(sb.SafetensorsPayload(ray.put(GOOD[:16].copy()), len(GOOD))))


@pytest.mark.unit
def test_unsupported_dtype_is_refused_in_the_driver():
    model = torch.nn.Module()
    model.register_buffer("z", torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(UnsupportedModelError, match="complex128"):
        prepare_model_for_actors(model, backend="safetensors")
