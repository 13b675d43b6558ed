"""A third-party ray_zerocopy transport: weights in a safetensors file, memory-mapped by every actor.

Use it when Ray's object store is too small to hold the model (or you want the weights
to survive in a file anyway): the driver writes one ``.safetensors`` file, each actor
maps it with ``MAP_SHARED``, and the OS page cache holds one copy per node however many
actors load it. The file must be at the same path on every node that runs actors: a
local disk for one node, shared storage (NFS, Lustre, ...) for several. Set
``RZC_SAFETENSORS_FILE_DIR`` to choose the folder (default: ``<tmp>/ray_zerocopy_files``).

Files are removed when the driver process that wrote them exits; an actor that already
mapped one keeps working, and a later load fails as it would for weights in the object store
(the payload holds a tiny object of the writing process, fetched on every load). Like Ray's object
store the mapping is shared and writable; ray_zerocopy re-maps the views copy-on-write (through the
file's path) as it does Ray's, so an in-place write stays in the actor that made it.

Install it (``pip install .``) where the driver and the actors run, then
``prepare_model_for_actors(model, backend="safetensors_file")``.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import ray
import torch
from safetensors import SafetensorError, safe_open

from ray_zerocopy import Backend, PayloadError, buffer_to_device, hookimpl, quiet_readonly
from ray_zerocopy.backends.safetensors_blob import PAD, write_blob

DIR_ENV = "RZC_SAFETENSORS_FILE_DIR"
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_written: dict[str, mmap.mmap] = {}  # files this process wrote (and maps); removed when it exits


@dataclass(frozen=True)
class FilePayload:
    path: str
    nbytes: int
    owner: ray.ObjectRef  # a tiny object of the writing process: the file is valid while it lives


def weights_dir() -> str:
    """Folder for the weight files: ``$RZC_SAFETENSORS_FILE_DIR`` or ``<tmp>/ray_zerocopy_files``."""
    return os.environ.get(DIR_ENV) or os.path.join(tempfile.gettempdir(), "ray_zerocopy_files")


@atexit.register
def _remove_written() -> None:
    for path in _written:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _map_resident(path: str) -> mmap.mmap:
    """Map the new file in the writer too and fault every page in, as Ray's store holds its objects:
    each page is then shared from the first actor's load on (never private to one actor)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    np.frombuffer(mapped, dtype=np.uint8)[:: mmap.PAGESIZE].sum()  # one read per page
    return mapped


def _layout(mapped: np.ndarray, path: str) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """Header of a file that safetensors itself has validated: (data start, name -> dtype, shape, begin, end)."""
    try:
        with safe_open(path, framework="pt"):  # the reference checks: lengths, offsets, overlaps, sizes
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise PayloadError(None, f"{path} is not a valid safetensors file ({exc})") from None
    n = int.from_bytes(mapped[:8].tobytes(), "little")
    header = json.loads(mapped[8 : 8 + n].tobytes())
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if name.startswith(PAD):  # zeros that align the next tensor (see write_blob)
            continue
        dtype = DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if dtype is None:
            raise PayloadError(name, f"dtype {info['dtype']} is not supported (known: {', '.join(DTYPES)})")
        if end > begin and (8 + n + begin) % dtype.itemsize:
            raise PayloadError(name, f"data offset {8 + n + begin} is not aligned to {dtype.itemsize} bytes")
        out[name] = (dtype, info["shape"], 8 + n + begin, 8 + n + end)
    return 8 + n, out


class SafetensorsFileBackend(Backend):
    """Weights in a safetensors file on disk; every actor maps it (zero-copy through the page cache)."""

    name = "safetensors_file"
    shared_memory_marker = ".safetensors"  # views live in a shared mapping of the file, not in Ray's store

    def put(self, weights: Mapping[str, torch.Tensor]) -> FilePayload:
        folder = weights_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{uuid.uuid4().hex}.safetensors")
        # (not safetensors' save_file: its tensors start wherever the one before ends, and CPU kernels
        # round differently for operands not 64-byte aligned: the actor's outputs would differ from the driver's)
        write_blob(weights).tofile(path + ".partial")
        os.replace(path + ".partial", path)  # readers never see a half-written file
        _written[path] = _map_resident(path)
        return FilePayload(path, os.path.getsize(path), ray.put(path))

    def get(self, payload: FilePayload, device: torch.device) -> dict[str, torch.Tensor]:
        if not isinstance(payload, FilePayload):
            raise PayloadError(None, f"expected a FilePayload, got {type(payload).__qualname__}")
        if ray.get(payload.owner) != payload.path:  # raises OwnerDiedError once the writer is gone
            raise PayloadError(None, f"payload of {payload.path} does not match the object its writer stored")
        try:
            with open(payload.path, "r+b") as f:  # the mapping keeps its own reference to the file
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
        except (FileNotFoundError, ValueError) as exc:
            raise PayloadError(None, f"weights file {payload.path} is missing or empty ({exc}); it is removed "
                               f"when the driver that wrote it exits, and must be visible at the same path on "
                               f"every node (set {DIR_ENV} to shared storage)") from None
        arr = np.frombuffer(mapped, dtype=np.uint8)
        if len(arr) != payload.nbytes:
            raise PayloadError(None, f"{payload.path} has {len(arr)} bytes, {payload.nbytes} were written")
        _, layout = _layout(arr, payload.path)
        arr.flags.writeable = False  # the same guard Ray's object store arrays carry
        with quiet_readonly():
            base = buffer_to_device(torch.from_numpy(arr), device)
        return {
            name: torch.empty(shape, dtype=dtype, device=base.device) if begin == end
            else base[begin:end].view(dtype).view(shape)
            for name, (dtype, shape, begin, end) in layout.items()
        }


@hookimpl
def register_backends(register):
    register(SafetensorsFileBackend)
