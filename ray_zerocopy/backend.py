"""The backend SDK: the transport interface and the small byte-level helpers every transport shares.

A backend moves the bytes of a model's unique weights from the driver into Ray's
object store (``put``) and back out inside an actor (``get``). It knows nothing of
modules, tied names or skeletons: those travel in the ModelRef, outside the backend.

A backend module (built-in or third-party) needs this module, ``ray_zerocopy.errors`` for
``PayloadError`` / ``UnsupportedModelError``, and ``hookimpl`` (re-exported here from ``hookspecs``).

Some names are defined in private modules below this one and re-exported here, their public home:
``dtype_name`` / ``dtype_from_name`` (``_dtypes.py``), ``array_offsets`` (``_views.py``, the CPU view
engine behind ``tensors_in_buffer`` and ``tensors_in_arrays``), ``put_joined`` and ``ALIGN`` (``_stream.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch

from ray_zerocopy._dtypes import dtype_from_name, dtype_name
from ray_zerocopy._shm import STORE_MARKER, PrivateViews
from ray_zerocopy._stream import ALIGN, address_of, put_joined
from ray_zerocopy._views import array_offsets, object_span, one_by_one, views
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
    return views(address_of(buf), buf.nbytes, buf, entries, marker)


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
    span = object_span(arrays, specs, offsets)
    if span is None:  # not the buffers of one object: map each alone
        return one_by_one(arrays, specs, marker)
    origin, nbytes, offsets = span
    out = PrivateViews()
    if offsets:  # (one pass over the tensors, in _views.views: this is a load's hot path)
        out = views(origin, nbytes, arrays, [(k, *specs[k], off) for k, off in offsets.items()], marker)
    if len(out) < len(specs):  # (an empty tensor has no bytes, hence no offset)
        out.update(one_by_one({k: arrays[k] for k in specs if k not in out}, specs, marker))
    return out


def arrays_to_device(
    arrays: Mapping[str, Any], specs: Mapping[str, tuple[str | torch.dtype, tuple[int, ...]]], device: torch.device,
    offsets: dict[str, int] | None = None, *, wait: bool = True,
) -> dict[str, torch.Tensor]:
    """The tensors of :func:`tensors_in_arrays` on ``device``: the span the arrays lie in (the buffers of
    one object) goes in one large copy (:func:`buffer_to_device`, the fast path to a GPU; ``wait`` as there),
    and each tensor is a view of it there; one copy per tensor where the arrays are not one compact span."""
    span = object_span(arrays, specs, offsets)
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
