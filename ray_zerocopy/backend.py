"""The backend SDK: the transport interface and the small byte-level helpers every transport shares.

A backend moves the bytes of a model's unique weights from the driver into Ray's
object store (``put``) and back out inside an actor (``get``). It knows nothing of
modules, tied names or skeletons: those travel in the ModelRef, outside the backend.

A backend module (built-in or third-party) needs this module, ``ray_zerocopy.errors`` for
``PayloadError`` / ``UnsupportedModelError``, and ``hookimpl`` (re-exported here from ``hookspecs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import operator
import warnings
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch

from ray_zerocopy._shm import STORE_MARKER, PrivateViews, aligned_copy, private_buffer
from ray_zerocopy._stream import ALIGN, address_of, put_joined
from ray_zerocopy.errors import PayloadError
from ray_zerocopy.hookspecs import hookimpl

__all__ = [
    "ALIGN", "STORE_MARKER", "Backend", "Payload", "array_offsets", "arrays_to_device", "buffer_to_device",
    "dtype_from_name", "dtype_name", "hookimpl", "put_joined", "quiet_readonly", "spec_of", "tensor_from_bytes",
    "tensor_to_bytes", "tensors_in_arrays", "tensors_in_buffer", "to_device",
]

Payload = Any  # whatever a backend's put() returns: small, picklable, holds the ObjectRefs


class Backend:
    """Base class of a weight transport.

    Subclasses set ``name`` (stable, lowercase) and implement ``put`` and ``get``.
    ``zero_copy`` says whether ``get(payload, cpu)`` returns views into shared memory;
    the conformance kit (``ray_zerocopy.testing``) checks the claim. ``shared_memory_marker``
    is a substring of the ``/proc/self/maps`` path of that memory (Ray's object store by
    default; a backend that maps a file of its own names it, e.g. ``".safetensors"``).

    Example::

        class PerTensor(Backend):
            name = "per_tensor"

            def put(self, weights):
                return {k: (ray.put(tensor_to_bytes(t)), spec_of(t)) for k, t in weights.items()}

            def get(self, payload, device):
                out = {k: tensor_from_bytes(ray.get(ref), *spec) for k, (ref, spec) in payload.items()}
                return to_device(out, device)
    """

    name: ClassVar[str]
    format_version: ClassVar[int] = 1
    zero_copy: ClassVar[bool] = True
    shared_memory_marker: ClassVar[str] = STORE_MARKER

    def put(self, weights: Mapping[str, torch.Tensor]) -> Payload:
        """Driver side: store unique, contiguous CPU tensors; return a small picklable payload."""
        raise NotImplementedError

    def get(self, payload: Payload, device: torch.device) -> dict[str, torch.Tensor]:
        """Actor side: tensors by name, CPU views into shared memory or copies on ``device``."""
        raise NotImplementedError


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (stable across torch versions, unlike numpy dtypes)."""
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)  # (called per tensor on a load's hot path)
def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` (the one place a dtype name is resolved); raises
    :class:`~ray_zerocopy.errors.PayloadError` (a ``ValueError``) for names this torch does not know."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PayloadError(None, f"unknown torch dtype {name!r} (torch {torch.__version__})",
                           "use a dtype name this torch has, e.g. 'float32' or 'bfloat16'")
    return dtype


def spec_of(tensor: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    """The (dtype name, shape) pair a backend needs to rebuild a tensor from raw bytes."""
    return dtype_name(tensor.dtype), tuple(tensor.shape)


def tensor_to_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's bytes (no copy; works for bfloat16 and fp8)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_to_bytes needs a contiguous CPU tensor")
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def tensor_from_bytes(buf: Any, dtype: str | torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor view of ``dtype`` and ``shape`` over a uint8 buffer (numpy array or memoryview). No copy.

    Call it inside :func:`quiet_readonly` when ``buf`` is read-only (it is, in Ray's object store).
    """
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    if len(buf) == 0:  # an empty tensor has no bytes to share (and numpy gives it stride 0)
        return torch.empty(shape, dtype=dtype)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is not None and isinstance(buf, np.ndarray):  # one torch op instead of three: 3-4x faster
        return torch.from_numpy(buf.view(np_dtype).reshape(shape))
    raw = torch.from_numpy(buf) if isinstance(buf, np.ndarray) else torch.frombuffer(buf, dtype=torch.uint8)
    return raw.view(dtype).view(shape)


def tensors_in_buffer(
    buf: np.ndarray, entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...], int]], marker: str = STORE_MARKER
) -> dict[str, torch.Tensor]:
    """Contiguous tensors ``(name, dtype, shape, byte offset)`` over one uint8 numpy buffer. No copy.

    Where the buffer lies in Ray's shared memory (``marker``) the tensors see it through a copy-on-write
    mapping: an in-place write changes this load's tensors only, never another actor's (see ``_shm.py``).
    The fast CPU path of one-buffer backends (``packed``, ``safetensors``).
    """
    return _views(address_of(buf), buf.nbytes, buf, entries, marker)


def tensors_in_arrays(
    arrays: Mapping[str, Any], specs: Mapping[str, tuple[str | torch.dtype, tuple[int, ...]]],
    marker: str = STORE_MARKER, offsets: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`tensor_from_bytes` of ``arrays[name]`` (a uint8 numpy array or a buffer) with ``specs[name]``
    (dtype, shape) for every name, copy-on-write (as :func:`tensors_in_buffer`) where the arrays lie in
    shared memory, such as the buffers of one object in Ray's store. No copy. The CPU path of the
    ``object_store`` backend.

    ``offsets`` (:func:`array_offsets` of the same object, in any process) spares reading every
    array's address: the first and last are checked against them, and all are read if they differ.
    """
    span = _span(arrays, specs, offsets)
    if span is None:  # not the buffers of one object: map each alone
        return _one_by_one(arrays, specs, marker)
    origin, nbytes, offsets = span
    out = PrivateViews()
    if offsets:  # (one pass over the tensors, in _views: this is a load's hot path)
        out = _views(origin, nbytes, arrays, [(k, *specs[k], off) for k, off in offsets.items()], marker)
    if len(out) < len(specs):  # (an empty tensor has no bytes, hence no offset)
        out.update(_one_by_one({k: arrays[k] for k in specs if k not in out}, specs, marker))
    return out


def arrays_to_device(
    arrays: Mapping[str, Any], specs: Mapping[str, tuple[str | torch.dtype, tuple[int, ...]]], device: torch.device,
    offsets: dict[str, int] | None = None, *, wait: bool = True,
) -> dict[str, torch.Tensor]:
    """The tensors of :func:`tensors_in_arrays` on ``device``: the span the arrays lie in (the buffers of
    one object) goes in one large copy (:func:`buffer_to_device`, the fast path to a GPU; ``wait`` as there),
    and each tensor is a view of it there; one copy per tensor where the arrays are not one compact span."""
    span = _span(arrays, specs, offsets)
    if span is None or device.type == "cpu":
        with quiet_readonly():
            return to_device({k: tensor_from_bytes(arrays[k], *spec) for k, spec in specs.items()}, device)
    origin, nbytes, offsets = span
    raw = (ctypes.c_char * max(nbytes, 1)).from_address(origin)
    raw.keep = arrays  # type: ignore[attr-defined]  # (ctypes arrays take attributes; the object stays pinned while its buffers live)
    dtypes = {k: dtype_from_name(dtype) if isinstance(dtype, str) else dtype for k, (dtype, _) in specs.items()}
    odd = any(off % dtypes[k].itemsize for k, off in offsets.items())  # (cloned below: that reads the bytes)
    with quiet_readonly():
        base = buffer_to_device(torch.frombuffer(raw, dtype=torch.uint8)[:nbytes], device, wait=wait or odd)
    out = {}
    for k, (_, shape) in specs.items():
        dtype = dtypes[k]
        off = offsets.get(k)
        if off is None:
            out[k] = torch.empty(shape, dtype=dtype, device=device)
        else:  # (Ray aligns each buffer to 64 bytes; an odd one gets a copy of its own to be aligned)
            piece = base[off : off + arrays[k].nbytes]
            out[k] = (piece if off % dtype.itemsize == 0 else piece.clone()).view(dtype).view(shape)
    return out


def _span(
    arrays: Mapping[str, Any], specs: Mapping[str, tuple], offsets: dict[str, int] | None,
) -> tuple[int, int, dict[str, int]] | None:
    """``(address, nbytes, offsets)`` of the span the non-empty arrays lie in, trusting ``offsets`` where its
    first and last entries match the arrays; None where the arrays are not one compact span."""
    def origin(k: str) -> int:  # where the offsets count from, according to array k
        return address_of(arrays[k]) - offsets[k]  # type: ignore[index]  # (called only while offsets is a dict)

    if offsets and origin(next(iter(offsets))) != origin(next(reversed(offsets))):
        offsets = None  # another layout than this object's
    trusted = bool(offsets)
    offsets = offsets or array_offsets({k: arrays[k] for k in specs if arrays[k].nbytes})
    if not offsets:
        return 0, 0, {}
    top = max(offsets, key=offsets.__getitem__)  # arrays do not overlap: the last to start ends last
    nbytes = offsets[top] + arrays[top].nbytes
    if not trusted and nbytes > sum(arrays[k].nbytes + ALIGN for k in offsets):
        return None
    return origin(top), nbytes, offsets


def _one_by_one(arrays: Mapping[str, Any], specs: Mapping[str, tuple], marker: str) -> PrivateViews:
    out = PrivateViews()
    for k, a in arrays.items():
        out.update(_views(address_of(a), a.nbytes, a, [(k, *specs[k], 0)], marker))
    return out


def array_offsets(arrays: Mapping[str, Any]) -> dict[str, int]:
    """Byte offset of each array (or buffer) from the ``ALIGN`` (64-byte) boundary at or below the lowest one. For
    the arrays of one Ray object they are the same in every process that gets it (the object's bytes are)."""
    addrs = {k: address_of(a) for k, a in arrays.items()}
    lo = min(addrs.values(), default=0) // ALIGN * ALIGN
    return {k: a - lo for k, a in addrs.items()}


def _views(
    addr: int, nbytes: int, keep: Any, entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...], int]],
    marker: str,
) -> PrivateViews:
    """``(name, dtype, shape, byte offset from addr)`` -> contiguous tensors over the ``nbytes`` from
    ``addr``, seen through a copy-on-write mapping of their shared memory (``keep`` keeps them alive;
    see ``_shm.py``), or over a private copy where they are not in shared memory (an object small
    enough for Ray to keep in a process's heap, which a write must not change either).

    Each run of neighbouring tensors of one dtype shares one storage over exactly their bytes (from
    the run's first tensor to its last's end), and no two storages overlap: ``torch.save`` of a state
    dict then writes every byte once, whatever the dtypes, and a load makes one storage per run
    instead of one per tensor (about half the time).
    """
    found = private_buffer(addr, nbytes, keep, marker) if nbytes else None
    buf, skip = found if found is not None else aligned_copy(addr, nbytes)
    out = PrivateViews()
    entries = list(entries)
    for dtype, run in _runs(entries):
        first, end = run[0][2], run[-1][2] + math.prod(run[-1][1]) * dtype.itemsize
        base = torch.frombuffer(buf, dtype=dtype, count=(end - first) // dtype.itemsize, offset=skip + first)
        for name, shape, offset in run:
            out[name] = base.as_strided(shape, _strides(shape), (offset - first) // dtype.itemsize)
    for name, kind, shape, _ in entries:  # (empty: no bytes to share, and may not be aligned for its dtype)
        if name not in out:
            out[name] = torch.empty(shape, dtype=dtype_from_name(kind) if isinstance(kind, str) else kind)
    return out


def _runs(entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...], int]]) -> list[tuple[torch.dtype, list]]:
    """The non-empty entries as runs ``(dtype, [(name, shape, offset), ...])``: neighbours in rising offsets,
    of one dtype, each at a whole number of elements from the run's first."""
    runs: list[tuple[torch.dtype, list]] = []
    end = -1  # where the last run's last tensor ends
    for name, dtype, shape, offset in sorted(entries, key=operator.itemgetter(3)):
        dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        count = math.prod(shape)
        if not count:
            continue
        if not runs or runs[-1][0] is not dtype or offset < end or (offset - runs[-1][1][0][2]) % dtype.itemsize:
            runs.append((dtype, []))
        runs[-1][1].append((name, tuple(shape), offset))
        end = offset + count * dtype.itemsize
    return runs


@functools.lru_cache(maxsize=4096)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides (in elements) for ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


# torch dtypes numpy has too (bfloat16 and fp8 have no numpy twin: they take the torch view path)
_NUMPY_DTYPES: dict[torch.dtype, Any] = {
    torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
    torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
    torch.uint8: np.uint8, torch.bool: np.bool_, torch.complex64: np.complex64, torch.complex128: np.complex128,
}


@contextlib.contextmanager
def quiet_readonly() -> Iterator[None]:
    """Silence torch's "not writable" warning, and only that one: zero-copy views of the object store
    are read-only by design (ray_zerocopy guards in-place writes itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The given (NumPy array|buffer) is not writable")
        yield


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy tensors to ``device`` one by one (the generic path; fast backends override it)."""
    if device.type == "cpu":
        return tensors
    return {k: t.to(device) for k, t in tensors.items()}


def buffer_to_device(buf: torch.Tensor, device: torch.device, *, wait: bool = True) -> torch.Tensor:
    """Copy one contiguous 1-D uint8 CPU buffer to ``device`` in as few large copies as possible.

    Backends that keep all weights in one buffer (``packed``, ``safetensors``) call this and
    then slice device views out of the result, instead of copying tensor by tensor. Such a backend
    passes ``wait=False``: where a GPU copier fills the buffer, the load then builds the model from the
    views while the copy runs, and waits for it before the model is returned; a backend that reads the
    bytes on the device (a kernel, a clone, a cast) must keep ``wait=True``.
    """
    if device.type == "cpu":
        return buf
    if device.type == "cuda":  # streamed through pinned staging buffers: see _cuda.py
        from ray_zerocopy._cuda import copy_to_device

        return copy_to_device(buf, device, wait=wait)
    return buf.to(device)
