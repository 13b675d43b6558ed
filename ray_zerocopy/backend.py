"""The transport interface and the small byte-level helpers every transport shares.

A backend moves the bytes of a model's unique weights from the driver into Ray's
object store (``put``) and back out inside an actor (``get``). It knows nothing of
modules, tied names or skeletons: those travel in the ModelRef, outside the backend.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch

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
    shared_memory_marker: ClassVar[str] = "plasma"

    def put(self, weights: Mapping[str, torch.Tensor]) -> Payload:
        """Driver side: store unique, contiguous CPU tensors; return a small picklable payload."""
        raise NotImplementedError

    def get(self, payload: Payload, device: torch.device) -> dict[str, torch.Tensor]:
        """Actor side: tensors by name, CPU views into shared memory or copies on ``device``."""
        raise NotImplementedError


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (stable across torch versions, unlike numpy dtypes)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``ValueError`` for names torch does not know."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
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
    buf: np.ndarray, entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...], int]], marker: str = "plasma"
) -> dict[str, torch.Tensor]:
    """Contiguous tensors ``(name, dtype, shape, byte offset)`` over one uint8 numpy buffer. No copy.

    Where the buffer lies in Ray's shared memory (``marker``) the tensors see it through a
    read-only mapping, so an in-place write faults instead of changing every actor's weights
    (see ``guard.py``); each tensor has a version counter of its own. The fast CPU path of
    one-buffer backends (``packed``, ``safetensors``).
    """
    from ray_zerocopy.guard import readonly_storage

    addr, storages, out = buf.ctypes.data, {}, {}
    for name, dtype, shape, offset in entries:
        dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        first = offset % dtype.itemsize  # a storage starting here puts every element at a whole index
        storage = storages.get(first)
        if storage is None:
            storage = readonly_storage(addr + first, buf.nbytes - first, buf, marker)
            if storage is None:  # private memory: a plain view
                with quiet_readonly():
                    storage = torch.from_numpy(buf[first:]).untyped_storage()
            storages[first] = storage
        out[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
    return out


def tensors_in_arrays(
    arrays: Mapping[str, np.ndarray], specs: Mapping[str, tuple[str | torch.dtype, tuple[int, ...]]],
    marker: str = "plasma",
) -> dict[str, torch.Tensor]:
    """:func:`tensor_from_bytes` of ``arrays[name]`` with ``specs[name]`` (dtype, shape) for every name,
    read-only (as :func:`tensors_in_buffer`) where the arrays lie in one shared mapping, such as
    the arrays of one object in Ray's store. No copy. The CPU path of the ``object_store`` backend.
    """
    from ray_zerocopy.guard import readonly_storage

    addrs = {k: arrays[k].__array_interface__["data"][0] for k in specs if arrays[k].nbytes}
    shared = lo = None
    if addrs:
        lo = min(addrs.values()) // 64 * 64  # Ray aligns each array of an object to 64 bytes
        shared = readonly_storage(lo, max(a + arrays[k].nbytes for k, a in addrs.items()) - lo, arrays, marker)
    out = {}
    for name, (dtype, shape) in specs.items():
        dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        index, rest = divmod(addrs[name] - lo, dtype.itemsize) if shared is not None and name in addrs else (0, 1)
        if rest:  # private memory, an empty tensor or an unaligned element: a plain view
            with quiet_readonly():
                out[name] = tensor_from_bytes(arrays[name], dtype, shape)
        else:
            out[name] = torch.empty(0, dtype=dtype).set_(shared, index, shape)
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


def buffer_to_device(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy one contiguous 1-D uint8 CPU buffer to ``device`` in as few large copies as possible.

    Backends that keep all weights in one buffer (``packed``, ``safetensors``) call this and
    then slice device views out of the result, instead of copying tensor by tensor.
    """
    if device.type == "cpu":
        return buf
    if device.type == "cuda":  # pinned in place or streamed through pinned buffers: see _cuda.py
        from ray_zerocopy._cuda import copy_to_device

        return copy_to_device(buf, device)
    return buf.to(device)
