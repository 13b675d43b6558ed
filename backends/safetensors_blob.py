"""The ``safetensors`` transport: all weights as one safetensors-format blob in the object store.

The blob is a valid safetensors file that any safetensors reader can read; unlike what
``safetensors.torch.save`` writes, its header is padded with spaces and small zero ``U8`` tensors
(named ``__ray_zerocopy_pad__.<n>``, dropped by this transport's reader) sit between tensors, so
that every tensor starts 64-byte aligned, as in the driver's memory: CPU kernels round differently
for misaligned operands, and the actor's outputs would differ from the driver's. It travels as one uint8 numpy array (out of band,
zero-copy). The driver never assembles the blob: it is written into the object store from the
header and views of the tensors (``put_joined``), with no copy of the weights in the driver. The
actor parses and validates the header itself and slices views out of the shared buffer; for a GPU
the whole blob is copied in one go.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import ray
import torch

from ray_zerocopy.backend import (
    ALIGN,
    Backend,
    buffer_to_device,
    hookimpl,
    put_joined,
    quiet_readonly,
    tensor_to_bytes,
    tensors_in_buffer,
)
from ray_zerocopy.errors import PayloadError, UnsupportedModelError

# safetensors dtype names that torch shares, in the order of the format's Dtype enum: writers
# sort tensors by this rank (widest first), then by name, which keeps every offset aligned.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),  # type: ignore[dict-item]
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "C64": torch.complex64, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
}
DTYPES = {name: dtype for name, dtype in DTYPES.items() if dtype is not None}  # (F8_E8M0: torch 2.7+)
_NAME_OF = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {name: rank for rank, name in enumerate(DTYPES)}
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
PAD = "__ray_zerocopy_pad__."  # prefix of the padding tensors that align the next tensor (dropped on read)
Entry = tuple[str, torch.dtype, tuple[int, ...], int, int]  # name, dtype, shape, begin, end (data offsets)


@dataclass(frozen=True)
class SafetensorsPayload:
    ref: ray.ObjectRef  # -> np.ndarray(uint8), the whole safetensors blob
    nbytes: int


def _header(weights: Mapping[str, torch.Tensor]) -> tuple[bytes, list[tuple[str, torch.Tensor, int]]]:
    """The JSON header padded with spaces to end on a 64-byte boundary, and (name, tensor, data offset) in
    order, with zero ``U8`` padding tensors (named ``PAD...``) where needed so that every tensor starts at a
    multiple of 64 bytes: CPU kernels round differently for operands that are not 16-byte aligned, and the
    driver's tensors are 64-byte aligned (the format allows no holes between tensors, hence named padding)."""
    if "__metadata__" in weights:  # the format reserves this key for free-form text
        raise UnsupportedModelError("", "a tensor is named '__metadata__'", "rename it, or use backend='packed'")
    for name, t in weights.items():
        if name.startswith(PAD):
            raise UnsupportedModelError(name.rpartition(".")[0], f"tensor {name!r} begins with {PAD!r}, which names "
                                        "this transport's padding", "rename it, or use backend='packed'")
        if t.dtype not in _NAME_OF:
            raise UnsupportedModelError(
                name.rpartition(".")[0], f"tensor {name!r} has dtype {t.dtype}, which the safetensors format lacks",
                "use backend='packed' or 'object_store', or convert the tensor to a dtype safetensors knows",
            )
    order = sorted(weights, key=lambda k: (-_RANK[_NAME_OF[weights[k].dtype]], k))
    parts: list[str] = []
    placed: list[tuple[str, torch.Tensor, int]] = []
    offset = 0
    for name in order:
        t = weights[name]
        if offset % ALIGN and t.nbytes:
            pad = torch.zeros(-offset % ALIGN, dtype=torch.uint8)
            placed.append((f"{PAD}{len(placed)}", pad, offset))
            offset += pad.nbytes
        placed.append((name, t, offset))
        offset += t.nbytes
    for name, t, begin in placed:
        shape = ",".join(str(d) for d in t.shape)
        entry = f'"dtype":"{_NAME_OF[t.dtype]}","shape":[{shape}],"data_offsets":[{begin},{begin + t.nbytes}]'
        parts.append(f"{json.dumps(name, ensure_ascii=False)}:{{{entry}}}")  # same escapes as serde_json
    header = ("{" + ",".join(parts) + "}").encode()
    return header + b" " * (-(8 + len(header)) % ALIGN), placed  # the data section starts 64-byte aligned


def write_blob(weights: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The safetensors serialization of ``weights`` in one new uint8 array (one copy of the data)."""
    header, placed = _header(weights)
    start = 8 + len(header)
    blob = np.empty(start + sum(t.nbytes for _, t, _ in placed), dtype=np.uint8)
    blob[:8] = np.frombuffer(len(header).to_bytes(8, "little"), dtype=np.uint8)
    blob[8:start] = np.frombuffer(header, dtype=np.uint8)
    out = torch.from_numpy(blob)
    for _, t, offset in placed:
        if t.nbytes:  # torch's copy is multi-threaded for large tensors, numpy's is not
            out[start + offset : start + offset + t.nbytes].copy_(torch.from_numpy(tensor_to_bytes(t)))
    return blob


def _segments(header: bytes, placed: list[tuple[str, torch.Tensor, int]]) -> Iterator[np.ndarray]:
    """The blob's bytes in order (:func:`write_blob`'s), as views of the tensors: the object store
    receives them without the driver assembling the blob (``put_joined``)."""
    yield np.frombuffer(len(header).to_bytes(8, "little") + header, dtype=np.uint8)
    for _, t, _ in placed:
        yield tensor_to_bytes(t)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise PayloadError(dup, "appears twice in the header")
    return out


def _numel(shape: list[int], limit: int) -> int:
    """Element count, stopping once past ``limit`` (a hostile shape must not cost a huge product)."""
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > limit:
            return limit + 1
    return numel


def _entry(name: str, info: Any, data_start: int, data_len: int) -> Entry:
    """One header entry, checked: known dtype, sane shape, offsets in range, size = shape x dtype size."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise PayloadError(name, f"header entry must be an object with dtype, shape, data_offsets; got {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise PayloadError(name, f"unknown dtype {dtype!r:.50}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise PayloadError(name, f"shape must be a list of non-negative integers, got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise PayloadError(name, f"data_offsets must be [begin, end] integers, got {offsets!r:.200}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise PayloadError(name, f"data_offsets [{begin}, {end}] lie outside the data section of {data_len} bytes")
    itemsize = DTYPES[dtype].itemsize
    numel = _numel(shape, data_len)
    if numel * itemsize != end - begin:
        raise PayloadError(name, f"holds {end - begin} bytes but shape {shape} of {dtype} needs {numel * itemsize}")
    if end > begin and (data_start + begin) % itemsize:
        raise PayloadError(name, f"offset {data_start + begin} is not aligned to {itemsize} bytes ({dtype}); "
                           "the writer did not pad the header to 8 bytes")
    return name, DTYPES[dtype], tuple(shape), begin, end


def parse_blob(blob: np.ndarray) -> tuple[int, tuple[Entry, ...]]:
    """Validate a safetensors blob completely and return (data start, entries) without making any view.

    Raises:
        PayloadError: the header length, JSON, any entry, or the layout (overlaps, holes) is wrong.
    """
    size = len(blob)
    if size < 8:
        raise PayloadError(None, f"blob of {size} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(blob[:8].tobytes(), "little")
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        raise PayloadError(None, f"header length {n} is impossible for a blob of {size} bytes (limit {MAX_HEADER})")
    return _parse_header(blob[8 : 8 + n].tobytes(), size)


@functools.lru_cache(maxsize=16)
def _parse_header(raw: bytes, size: int) -> tuple[int, tuple[Entry, ...]]:
    """:func:`parse_blob` after the length: once per distinct header and blob size in a process (a reload
    of GPT-2's 364 tensors skips ~2 ms of JSON and checks)."""
    n = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, PayloadError):
            raise
        raise PayloadError(None, f"header is not valid UTF-8 JSON ({type(exc).__name__}: {str(exc):.200})") from None
    if not isinstance(header, dict):
        raise PayloadError(None, f"header must be a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)  # free-form text written by other tools; carries no layout
    data_start, data_len = 8 + n, size - 8 - n
    entries = tuple(sorted((_entry(k, v, data_start, data_len) for k, v in header.items()), key=lambda e: e[3:]))
    expected = 0
    for name, _, _, begin, end in entries:
        if begin != expected:
            problem = "overlaps the tensor before it" if begin < expected else "leaves a hole before it"
            raise PayloadError(name, f"data_offsets [{begin}, {end}] {problem} (expected to begin at {expected})")
        expected = end
    if expected != data_len:
        raise PayloadError(None, f"tensors cover {expected} bytes but the data section holds {data_len}")
    return data_start, tuple(e for e in entries if not e[0].startswith(PAD))


def views(base: torch.Tensor, data_start: int, entries: tuple[Entry, ...]) -> dict[str, torch.Tensor]:
    """Tensors sliced out of ``base`` (the whole blob as a 1-D uint8 tensor, on any device)."""
    out = {}
    for name, dtype, shape, begin, end in entries:
        if begin == end:  # no bytes to share; an empty slice may not be aligned for its dtype
            out[name] = torch.empty(shape, dtype=dtype, device=base.device)
        else:
            out[name] = base[data_start + begin : data_start + end].view(dtype).view(shape)
    return out


class SafetensorsBackend(Backend):
    name = "safetensors"

    def put(self, weights: Mapping[str, torch.Tensor]) -> SafetensorsPayload:
        header, placed = _header(weights)
        return SafetensorsPayload(put_joined(_segments(header, placed)), 8 + len(header) + sum(t.nbytes for _, t, _ in placed))

    def get(self, payload: SafetensorsPayload, device: torch.device) -> dict[str, torch.Tensor]:
        if not isinstance(payload, SafetensorsPayload):
            raise PayloadError(None, f"expected a SafetensorsPayload, got {type(payload).__qualname__}")
        blob = ray.get(payload.ref)
        if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1 or len(blob) != payload.nbytes:
            raise PayloadError(None, f"stored object is not the {payload.nbytes}-byte uint8 blob that was put")
        data_start, entries = parse_blob(blob)
        with quiet_readonly():
            if device.type == "cpu":
                entries_at = [(name, dtype, shape, data_start + begin) for name, dtype, shape, begin, _ in entries]
                return tensors_in_buffer(blob, entries_at)
            base = torch.from_numpy(blob)
        return views(buffer_to_device(base, device, wait=False), data_start, entries)  # (views only)


@hookimpl
def register_backends(register):
    register(SafetensorsBackend)
