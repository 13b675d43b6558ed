"""The fast host-to-device path: one large buffer from shared memory to a GPU near the PCIe limit.

``tensor.to("cuda")`` from pageable memory (Ray's object store is pageable shared memory) makes the
CUDA driver bounce every byte through a small pinned buffer of its own, on one thread, at a fraction
of what pinned memory reaches. Here a few worker threads copy chunks of the buffer into a small
ring of pinned staging buffers (a CPU copy releases the GIL) while the GPU drains the full ones:
bounded extra host memory (two buffers a thread), no second copy of the model. The ring is ordinary
memory pinned with ``cudaHostRegister`` (much cheaper than ``cudaHostAlloc``) in a background thread
that a load starts as it begins (:func:`warm_ring`); it stays pinned for the process's next load. Pinning the object store's pages
in place instead, and copying straight from them, was slower (docs/benchmarks.md has the figures).

Any pinning failure falls back, with one log line, to pinned memory from torch's allocator, then to
plain pageable copies, and leaves no CUDA error behind. Threads and chunk size can be overridden by
environment variables, read on every call (so a Ray ``runtime_env`` can set them per actor).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

from ray_zerocopy import _procmaps
from ray_zerocopy._env import env_number
from ray_zerocopy._log import warn_once
from ray_zerocopy.errors import EnvVarError, PayloadError

ROUTE_ENV = "RAY_ZEROCOPY_H2D_ROUTE"  # auto | copier | staged | plain
THREADS_ENV = "RAY_ZEROCOPY_H2D_THREADS"  # staging threads
CHUNK_ENV = "RAY_ZEROCOPY_H2D_CHUNK_MB"  # staging buffer size
ROUTES = ("auto", "copier", "staged", "plain")
MIN_FAST_BYTES = 8 << 20  # below this one plain copy is as quick as setting up threads and pins
STAGING_BUFFERS = 2  # per thread: one being filled while the GPU drains the other
_READ_ONLY = 8  # cudaHostRegisterReadOnly: we only read, and Ray may map the store read-only
_MADV_HUGEPAGE = 14
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device of the process (the ring is pinned in another thread)
_RING_ALIGN = 2 << 20  # the ring starts on a 2 MiB boundary (huge pages)


class PinError(RuntimeError):
    """cudaHostRegister refused a range (already pinned, unsupported memory, limits)."""


# The ``copier`` route's source, set around a load (``gpu_copier.copier_source``), with the fills it has
# started: ``source(buf, dst)`` starts filling ``dst`` from ``buf`` and returns a function that waits for the
# fill and says whether it was made (else the staged route copies), or None where it cannot fill.
_source: contextvars.ContextVar[tuple[Callable[[torch.Tensor, torch.Tensor], Any], list] | None] = \
    contextvars.ContextVar("rzc_copy_source", default=None)


@contextlib.contextmanager
def copy_source(source: Callable[[torch.Tensor, torch.Tensor], Any] | None) -> Iterator[None]:
    """Within this block, :func:`copy_to_device`'s ``copier`` route first asks ``source(buf, dst)``. A fill
    started with ``wait=False`` ends at the first torch call in a :func:`finished_before_torch_calls` block,
    or at the end of this block, also on an error (the copier writes into the device memory until then)."""
    token = _source.set((source, []) if source is not None else None)
    try:
        yield
    finally:
        try:
            _finish_copies()
        finally:
            _source.reset(token)


def _finish_copies() -> None:
    """Wait for the fills this block's copier source started without waiting; copy here those it did not make."""
    current = _source.get()
    while current and current[1]:
        done, buf, dst = current[1].pop()
        if not done():
            _staged(buf, dst, *settings())


class _FinishFirst(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        _finish_copies()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def finished_before_torch_calls() -> Iterator[None]:
    """Within this block, a torch call waits for the pending fills first: code that runs while a model is
    rebuilt (a module's own ``__setstate__``) may read its weights. A plain rebuild makes no torch call."""
    current = _source.get()
    if current and current[1]:
        with _FinishFirst():
            yield
    else:
        yield


def current_route() -> str:
    """The host-to-device route this process is set to (``$RAY_ZEROCOPY_H2D_ROUTE``, default auto)."""
    return os.environ.get(ROUTE_ENV) or "auto"


def settings(threads: int | None = None, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(staging threads, staging chunk bytes): explicit values, else the environment, else the defaults:
    ``min(6, cpu_count)`` threads and 4 MiB buffers (the copy is memory-bound and short: a burst of a
    few threads is what makes a load fast, more threads were slower; 8 MiB buffers make reloads
    faster but a first load slower, as the larger ring takes twice as long to pin)."""
    threads = threads or int(env_number(THREADS_ENV, 0)) or min(6, os.cpu_count() or 1)
    chunk_bytes = chunk_bytes or int(env_number(CHUNK_ENV, 0) * (1 << 20)) or (4 << 20)
    return max(1, threads), max(1 << 16, chunk_bytes)


def copy_to_device(
    buf: torch.Tensor,
    device: torch.device,
    *,
    route: str | None = None,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    wait: bool = True,
) -> torch.Tensor:
    """Copy a contiguous 1-D uint8 CPU tensor to a CUDA device by the fastest route that works.

    Args:
        buf: the bytes (typically a view of Ray's object store).
        device: a CUDA device of this process.
        route: ``auto`` (default, or ``$RAY_ZEROCOPY_H2D_ROUTE``) and ``staged``: through the pinned ring
            (see the module docstring); ``copier``: by the node's copier of the model where a load set one
            (:func:`copy_source`, ``gpu_copier.py``; ``auto`` too, for a model prepared with ``gpu_copiers``),
            else staged; ``plain`` is ``buf.to(device)``.
        threads: staging threads (default ``$RAY_ZEROCOPY_H2D_THREADS`` or min(6, cores)).
        chunk_bytes: bytes per staging buffer (default ``$RAY_ZEROCOPY_H2D_CHUNK_MB`` or 4 MiB).
        wait: False lets a copier's fill end later (see :func:`copy_source`): for callers that only take
            views of the result until then (a load builds its model meanwhile), never read its bytes before.

    Returns:
        A new uint8 tensor on ``device`` with the same bytes (the copy has finished, unless ``wait=False``).

    Raises:
        ValueError: ``buf`` is not a contiguous 1-D uint8 CPU tensor, or ``route`` is unknown.

    Example:
        >>> dev_buf = copy_to_device(torch.frombuffer(blob, dtype=torch.uint8), torch.device("cuda"))  # doctest: +SKIP
    """
    if buf.device.type != "cpu" or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise PayloadError(None, f"copy_to_device needs a contiguous 1-D uint8 CPU tensor, got {buf.dtype} "
                           f"{tuple(buf.shape)} on {buf.device}", "pass buf.reshape(-1).view(torch.uint8)")
    route = route or current_route()
    if route not in ROUTES:
        raise EnvVarError(ROUTE_ENV, route, f"one of {ROUTES} (unknown host-to-device route {route!r})")
    if route == "plain" or buf.numel() < MIN_FAST_BYTES or buf.is_pinned():
        return buf.to(device)
    dst = torch.empty(buf.numel(), dtype=torch.uint8, device=device)
    current = _source.get()
    done = current[0](buf, dst) if current and route in ("auto", "copier") else None
    if current and done is not None and not wait:
        current[1].append((done, buf, dst))
        return dst
    if done is None or not done():
        _staged(buf, dst, *settings(threads, chunk_bytes))
    return dst


def _staged(buf: torch.Tensor, dst: torch.Tensor, threads: int, chunk_bytes: int) -> None:
    with _ring(dst.device, STAGING_BUFFERS * threads, chunk_bytes) as ring:
        _stream_through(ring, buf, dst, threads)


# ------------------------------------------------------------------ cudart through ctypes


class _Cudart:
    """cudaHostRegister/Unregister and cudaGetLastError from the libcudart torch already loaded.

    ctypes releases the GIL during each call, so pinning runs beside the staging threads.
    """

    def __init__(self) -> None:
        path = _loaded_library("libcudart")
        if path is None:
            raise PinError("libcudart is not loaded as a shared library in this process")
        lib = ctypes.CDLL(path)
        self.register: Callable[..., int] = lib.cudaHostRegister
        self.register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self.unregister: Callable[..., int] = lib.cudaHostUnregister
        self.unregister.argtypes = [ctypes.c_void_p]
        self.last_error: Callable[[], int] = lib.cudaGetLastError
        self.error_name = lib.cudaGetErrorName
        self.error_name.restype = ctypes.c_char_p

    def pin(self, ptr: int, size: int, flags: int = _READ_ONLY) -> None:
        err = self.register(ptr, size, flags)
        if err:
            self.last_error()  # clear this thread's sticky "last error" so no later torch call trips on it
            raise PinError(f"cudaHostRegister: {self.error_name(err).decode()} ({err})")


_cudart: _Cudart | None = None


def _loaded_library(stem: str) -> str | None:
    for m in _procmaps.read():
        name = m.path.rsplit("/", 1)[-1]
        if name.startswith(stem) and ".so" in name:  # libcudart.so.13, or a wheel's libcudart-<hash>.so.12
            return m.path
    return None


def _get_cudart() -> _Cudart:
    global _cudart
    if _cudart is None:
        _cudart = _Cudart()
    return _cudart


def pin_host(ptr: int, nbytes: int) -> None:
    """Page-lock ``nbytes`` at ``ptr`` for reading by every device of this process (``cudaHostRegister``,
    read-only: Ray may map its store read-only). Raises :class:`PinError`."""
    _get_cudart().pin(ptr, nbytes, flags=_READ_ONLY | _PORTABLE)


def unpin_host(ptr: int) -> None:
    """Undo :func:`pin_host`."""
    _get_cudart().unregister(ptr)


# ------------------------------------------------------------------ the pinned ring and the copy


class _Ring:
    """``nbuf`` staging buffers of ``chunk_bytes``: ordinary memory on a 2 MiB boundary, advised to use huge
    pages, pinned with one cudaHostRegister call by a thread of its own (started as a load begins, so the
    pinning overlaps fetching the payload). Where registering fails: torch's pinned allocator, else
    pageable buffers (slow, correct).

    Pinning slot by slot while the first slots are already copied was slower on first loads: registering
    memory holds up the other threads' CUDA calls."""

    def __init__(self, device: torch.device, nbuf: int, chunk_bytes: int) -> None:
        self.shape = (nbuf, chunk_bytes)
        raw = torch.empty(nbuf * chunk_bytes + _RING_ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % _RING_ALIGN
        self.buf = raw[skip : skip + nbuf * chunk_bytes].view(nbuf, chunk_bytes)
        _advise_huge_pages(self.buf.data_ptr(), self.buf.nbytes)
        self.pinned = False  # registered with cudaHostRegister (by the thread)
        self.thread = threading.Thread(target=self._pin, args=(device,), name="rzc-ring", daemon=True)
        self.thread.start()

    def _pin(self, device: torch.device) -> None:
        try:
            torch.cuda.set_device(device)  # (the runtime's current device is per thread)
            _get_cudart().pin(self.buf.data_ptr(), self.buf.nbytes, flags=_PORTABLE)  # written by the CPU
            self.pinned = True
        except Exception as exc:  # PinError, no libcudart, a CUDA error
            warn_once(f"pinning the staging buffers failed ({exc}); allocating pinned memory instead")
            try:
                self.buf = torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc2:  # memlock limits, out of memory
                warn_once(f"pinned staging buffers could not be allocated ({exc2}); using plain pageable copies")

    def ready(self) -> torch.Tensor:
        """The buffers, once pinned (or once pinning has given up: then as they are)."""
        self.thread.join()
        return self.buf

    def release(self) -> None:
        """Unpin the buffers (once the pinning thread has ended)."""
        self.thread.join()
        if self.pinned:
            _get_cudart().unregister(self.buf.data_ptr())
            self.pinned = False


_kept_ring: list[_Ring] = []  # the process's ring, kept pinned for its next load
_kept_lock = threading.Lock()


def warm_ring(device: torch.device) -> None:
    """Start pinning the staging ring, if this process has none yet: a load calls this as it starts, so
    the pinning overlaps the rest of the load (fetching the payload, reading its index) and the copy's start."""
    with _kept_lock:
        if _kept_ring or current_route() == "plain":
            return
        threads, chunk_bytes = settings()
        _kept_ring.append(_Ring(device, STAGING_BUFFERS * threads, chunk_bytes))


@contextlib.contextmanager
def _ring(device: torch.device, nbuf: int, chunk_bytes: int) -> Iterator[_Ring]:
    """The kept ring if it has this shape (one of another shape is unpinned), else a new one; kept after
    the copy unless another load of this process kept its ring first."""
    with _kept_lock:
        ring = _kept_ring.pop() if _kept_ring else None
    if ring is not None and ring.shape != (nbuf, chunk_bytes):
        ring.release()
        ring = None
    ring = ring or _Ring(device, nbuf, chunk_bytes)
    try:
        yield ring
    finally:
        with _kept_lock:
            keep = not _kept_ring
            if keep:
                _kept_ring.append(ring)
        if not keep:
            ring.release()


def _advise_huge_pages(ptr: int, nbytes: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(ptr, nbytes, _MADV_HUGEPAGE)  # (a hint: where transparent huge pages are off, nothing changes)
    except (OSError, AttributeError):
        pass


def _side_stream(dst: torch.Tensor) -> torch.cuda.Stream:
    """A stream for the copies that first waits for the current one (dst's memory may have just been
    freed by work still queued there)."""
    stream = torch.cuda.Stream(dst.device)
    stream.wait_stream(torch.cuda.current_stream(dst.device))
    return stream


def _stream_through(ring: _Ring, src: torch.Tensor, dst: torch.Tensor, threads: int) -> None:
    """Worker threads fill the ring's buffers from the front of ``src``; the GPU copies each one as soon
    as it is full, and the buffer is refilled once that copy has finished."""
    nbuf, chunk_bytes = ring.shape
    staging = ring.ready()
    starts = iter(range(0, src.numel(), chunk_bytes))
    stream = _side_stream(dst)
    pending: deque[tuple[Any, int, int, int]] = deque()  # (fill future, slot, lo, hi) in DMA order

    def fill(slot: int, lo: int, hi: int, free: Any) -> torch.Tensor:
        if free is not None:
            free.synchronize()  # the GPU has finished reading this buffer (releases the GIL)
        return staging[slot, : hi - lo].copy_(src[lo:hi])

    def submit(slot: int, free: Any) -> None:
        lo = next(starts, None)
        if lo is not None:
            hi = min(lo + chunk_bytes, src.numel())
            pending.append((pool.submit(fill, slot, lo, hi, free), slot, lo, hi))

    with ThreadPoolExecutor(threads, thread_name_prefix="rzc-stage") as pool:
        try:
            for slot in range(nbuf):
                submit(slot, None)
            with torch.cuda.stream(stream):
                while pending:
                    fut, slot, lo, hi = pending.popleft()
                    dst[lo:hi].copy_(fut.result(), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    submit(slot, event)
        finally:
            stream.synchronize()  # the ring may be unpinned and freed only after its last DMA
    torch.cuda.current_stream(dst.device).wait_stream(stream)
