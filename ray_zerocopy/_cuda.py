"""The fast host-to-device path: one large buffer from shared memory to a GPU near the PCIe limit.

Why this exists: ``tensor.to("cuda")`` from pageable memory (Ray's object store is pageable
shared memory) makes the CUDA driver bounce every byte through a small pinned buffer of its
own, on one thread: 5.5-7.5 GB/s on an H100, where pinned memory reaches ~55 GB/s. Routes to
pinned speed without a second full host copy (measured on the H100 VM, 2 GiB, fresh process):

- ``staged`` (what ``auto`` uses): 6 worker threads copy 4 MiB chunks into a small ring of pinned
  buffers (a CPU copy releases the GIL) while the GPU drains the full ones: 19-23 GB/s cold
  (8 threads 16-20, 12 and 16 slower still: they contend), bounded extra host memory (2 buffers a
  thread, 48 MiB). The ring is ordinary memory pinned with ``cudaHostRegister`` (~50 ms/GB there)
  rather than ``cudaHostAlloc`` (~400 ms/GB there); one ring stays pinned for the process's next load.
- ``register``: one thread pins the object store's pages in place chunk by chunk (read-only flag)
  and starts each chunk's DMA as soon as it is pinned: 13-18 GB/s, no staging memory; more
  threads do not help (the driver serializes pinning).
- ``hybrid``: both at once, pinning from the back and staging from the front until they meet:
  13-14 GB/s there (they contend), kept for machines where pinning is cheap.

Any pinning failure (memory already pinned, unsupported, limits) falls back, with one log line, to
the next route down (pin in place -> staging -> plain copy), and leaves no CUDA error behind.
Route, threads and chunk sizes can be overridden by environment variables, read on every call
(so a Ray ``runtime_env`` can set them per actor).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

from ray_zerocopy import _procmaps
from ray_zerocopy._log import warn_once

ROUTE_ENV = "RAY_ZEROCOPY_H2D_ROUTE"  # auto | staged | register | hybrid | plain
THREADS_ENV = "RAY_ZEROCOPY_H2D_THREADS"  # staging threads
CHUNK_ENV = "RAY_ZEROCOPY_H2D_CHUNK_MB"  # staging buffer size
PIN_CHUNK_ENV = "RAY_ZEROCOPY_H2D_PIN_CHUNK_MB"  # bytes pinned per cudaHostRegister call
ROUTES = ("auto", "staged", "register", "hybrid", "plain")
MIN_FAST_BYTES = 8 << 20  # below this one plain copy is as quick as setting up threads and pins
STAGING_BUFFERS = 2  # per thread: one being filled while the GPU drains the other
_READ_ONLY = 8  # cudaHostRegisterReadOnly: we only read, and Ray may map the store read-only
_MADV_HUGEPAGE = 14
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device of the process (a ring may be pinned in another thread)
_PAGE = 2 << 20  # pinned chunks start and end on 2 MiB boundaries: no two registrations share a page


class PinError(RuntimeError):
    """cudaHostRegister refused a range (already pinned, unsupported memory, limits)."""


def _env_mb(name: str) -> int:
    return int(float(os.environ.get(name) or 0) * (1 << 20))


def settings(
    threads: int | None = None, chunk_bytes: int | None = None, pin_chunk_bytes: int | None = None
) -> tuple[int, int, int]:
    """(staging threads, staging chunk bytes, pin chunk bytes): explicit values, else the environment,
    else the defaults: ``min(6, cpu_count)`` threads (the copy is memory-bound and short: a burst of
    a few threads is what makes a load fast; 8, 12 and 16 measured slower), 4 MiB staging buffers,
    64 MiB pinned per call."""
    threads = threads or int(os.environ.get(THREADS_ENV) or 0) or min(6, os.cpu_count() or 1)
    chunk_bytes = chunk_bytes or _env_mb(CHUNK_ENV) or (4 << 20)
    pin_chunk_bytes = pin_chunk_bytes or _env_mb(PIN_CHUNK_ENV) or (64 << 20)
    return max(1, threads), max(1 << 16, chunk_bytes), max(_PAGE, pin_chunk_bytes // _PAGE * _PAGE)


def copy_to_device(
    buf: torch.Tensor,
    device: torch.device,
    *,
    route: str | None = None,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    pin_chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Copy a contiguous 1-D uint8 CPU tensor to a CUDA device by the fastest route that works.

    Args:
        buf: the bytes (typically a view of Ray's object store).
        device: a CUDA device of this process.
        route: ``auto`` (default, or ``$RAY_ZEROCOPY_H2D_ROUTE``; currently ``staged``): see the module
            docstring for ``staged``, ``register``, ``hybrid``; ``plain`` is ``buf.to(device)``.
        threads: staging threads (default ``$RAY_ZEROCOPY_H2D_THREADS`` or min(6, cores)).
        chunk_bytes: bytes per staging buffer (default ``$RAY_ZEROCOPY_H2D_CHUNK_MB`` or 4 MiB).
        pin_chunk_bytes: bytes pinned per call (default ``$RAY_ZEROCOPY_H2D_PIN_CHUNK_MB`` or 64 MiB).

    Returns:
        A new uint8 tensor on ``device`` with the same bytes (the copy has finished).

    Raises:
        ValueError: ``buf`` is not a contiguous 1-D uint8 CPU tensor, or ``route`` is unknown.

    Example:
        >>> dev_buf = copy_to_device(torch.frombuffer(blob, dtype=torch.uint8), torch.device("cuda"))  # doctest: +SKIP
    """
    if buf.device.type != "cpu" or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"copy_to_device needs a contiguous 1-D uint8 CPU tensor, got {buf.dtype} "
                         f"{tuple(buf.shape)} on {buf.device}. Fix: pass buf.reshape(-1).view(torch.uint8)")
    route = route or os.environ.get(ROUTE_ENV) or "auto"
    if route not in ROUTES:
        raise ValueError(f"unknown host-to-device route {route!r}; expected one of {ROUTES}. "
                         f"Fix: set {ROUTE_ENV} to one of those")
    if route == "plain" or buf.numel() < MIN_FAST_BYTES or buf.is_pinned():
        return buf.to(device)
    dst = torch.empty(buf.numel(), dtype=torch.uint8, device=device)
    threads, chunk_bytes, pin_chunk_bytes = settings(threads, chunk_bytes, pin_chunk_bytes)
    cursor = _Cursor(buf.numel())
    pinner = _Pinner(buf, dst, cursor, pin_chunk_bytes) if route in ("register", "hybrid") else None
    try:
        if route != "register":
            _stage(buf, dst, cursor, threads, chunk_bytes)
    finally:
        error = pinner.finish() if pinner is not None else None
    if error is not None:
        warn_once(f"pinning the buffer in place failed ({error}); copying the rest through pinned staging buffers")
    if cursor.left():  # pinning stopped and nothing else took the rest (route "register")
        _stage(buf, dst, cursor, threads, chunk_bytes)
    return dst


class _Cursor:
    """Hands out disjoint ranges of [0, n): staging takes from the front, pinning from the back."""

    def __init__(self, n: int) -> None:
        self.front, self.back, self.lock = 0, n, threading.Lock()

    def take_front(self, size: int) -> tuple[int, int] | None:
        with self.lock:
            if self.front >= self.back:
                return None
            lo, self.front = self.front, min(self.back, self.front + size)
            return lo, self.front

    def take_back(self, size: int, base: int) -> tuple[int, int] | None:
        """A range ending at the current back whose start lies on a 2 MiB boundary of memory (or is 0)."""
        with self.lock:
            lo = (base + self.back - size) // _PAGE * _PAGE - base
            floor = 0 if self.front == 0 else -(-(base + self.front) // _PAGE) * _PAGE - base
            lo = max(lo, floor)
            if lo >= self.back:
                return None
            hi, self.back = self.back, lo
            return lo, hi

    def give_back(self, lo: int, hi: int) -> None:
        with self.lock:
            if self.back == lo:
                self.back = hi

    def left(self) -> bool:
        with self.lock:
            return self.front < self.back


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


# ------------------------------------------------------------------ the two sides of the copy


class _Pinner:
    """One thread that pins chunks from the back of the buffer and queues each one's DMA at once."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, cursor: _Cursor, chunk_bytes: int) -> None:
        self.src, self.dst, self.cursor, self.chunk_bytes = src, dst, cursor, chunk_bytes
        self.stream = _side_stream(dst)
        self.pinned: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="rzc-pin", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            cudart = _get_cudart()
            torch.cuda.set_device(self.dst.device)  # the runtime's current device is per thread
            base = self.src.data_ptr()
            with torch.cuda.stream(self.stream):
                while (rng := self.cursor.take_back(self.chunk_bytes, base)) is not None:
                    lo, hi = rng
                    try:
                        cudart.pin(base + lo, hi - lo)
                    except PinError:
                        self.cursor.give_back(lo, hi)  # staging copies it instead
                        raise
                    self.pinned.append(base + lo)
                    self.dst[lo:hi].copy_(self.src[lo:hi], non_blocking=True)
        except BaseException as exc:  # reported by finish(): the caller logs it and staging covers the rest
            self.error = exc

    def finish(self) -> BaseException | None:
        """Wait for the thread and its DMAs, unpin everything it pinned; return its error, if any."""
        self.thread.join()
        self.stream.synchronize()  # no DMA may read a page after it is unpinned
        for ptr in self.pinned:
            _get_cudart().unregister(ptr)
        torch.cuda.current_stream(self.dst.device).wait_stream(self.stream)
        return self.error


def _side_stream(dst: torch.Tensor) -> torch.cuda.Stream:
    """A stream for the copies that first waits for the current one (dst's memory may have just been
    freed by work still queued there)."""
    stream = torch.cuda.Stream(dst.device)
    stream.wait_stream(torch.cuda.current_stream(dst.device))
    return stream


def _stage(src: torch.Tensor, dst: torch.Tensor, cursor: _Cursor, threads: int, chunk_bytes: int) -> None:
    """Worker threads fill a ring of pinned buffers from the front of the buffer; the GPU copies
    each one as soon as it is full, and the buffer is refilled once that copy has finished."""
    nbuf = STAGING_BUFFERS * threads
    try:
        with _pinned_ring(nbuf, chunk_bytes) as ring:
            _stream_through(ring, src, dst, cursor, threads)
    except _NoPinnedMemory as exc:
        warn_once(f"pinned staging buffers could not be allocated ({exc}); using plain pageable copies")
        while (rng := cursor.take_front(chunk_bytes)) is not None:
            dst[rng[0] : rng[1]].copy_(src[rng[0] : rng[1]])


class _NoPinnedMemory(RuntimeError):
    pass


_kept_ring: list[torch.Tensor] = []  # the last pinned ring, kept for the next load in this process
_kept_lock = threading.Lock()
_warming: list[threading.Thread] = []  # a thread pinning a ring ahead of the copy (warm_ring)


def warm_ring(device: torch.device) -> None:
    """Start pinning the staging ring in a background thread, if this process has none yet.

    A process's first copy otherwise waits for it before its first byte moves (allocating, touching and
    pinning 48 MiB: 15-20 ms on the H200, a fifth of a 1.5 GB first load); a load calls this as it
    starts, so the pinning overlaps the rest of the load (fetching the payload, reading its index).
    """
    with _kept_lock:
        if _kept_ring or _warming or (os.environ.get(ROUTE_ENV) or "auto") not in ("auto", "staged"):
            return
        threads, chunk_bytes, _ = settings()
        thread = threading.Thread(target=_warm, args=(device, STAGING_BUFFERS * threads, chunk_bytes),
                                  name="rzc-ring", daemon=True)
        _warming.append(thread)
    thread.start()


def _warm(device: torch.device, nbuf: int, chunk_bytes: int) -> None:
    ring = None
    try:
        torch.cuda.set_device(device)  # (the runtime's current device is per thread)
        ring = _registered_ring(nbuf, chunk_bytes)
    finally:
        with _kept_lock:
            _warming.clear()
            keep = ring is not None and not _kept_ring
            if keep and ring is not None:  # (the second test for the type checker)
                _kept_ring.append(ring)
        if ring is not None and not keep:
            _get_cudart().unregister(ring.data_ptr())


def _wait_for_warm_ring() -> None:
    with _kept_lock:
        warming = list(_warming)
    for thread in warming:
        thread.join()


@contextlib.contextmanager
def _pinned_ring(nbuf: int, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """``nbuf`` pinned staging buffers: ordinary memory pinned with cudaHostRegister (8x cheaper than
    cudaHostAlloc on the measured machine), else torch's pinned allocator (which caches it itself).

    One registered ring (48 MiB by default) is kept pinned for the next load in this process:
    allocating, touching and pinning it again cost ~10 ms a load, a sixth of a 1.5 GB copy.
    """
    _wait_for_warm_ring()
    ring = _take_kept_ring((nbuf, chunk_bytes))
    if ring is None:
        ring = _registered_ring(nbuf, chunk_bytes)
    if ring is None:
        try:
            ring = torch.empty((nbuf, chunk_bytes), dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:  # memlock limits, out of memory
            raise _NoPinnedMemory(str(exc)) from exc
        yield ring
        return
    try:
        yield ring
    finally:
        with _kept_lock:
            keep = not _kept_ring
            if keep:
                _kept_ring.append(ring)
        if not keep:  # another load in this process kept its ring first
            _get_cudart().unregister(ring.data_ptr())


def _take_kept_ring(shape: tuple[int, int]) -> torch.Tensor | None:
    """The kept ring if it has this shape; one of another shape (other settings since) is unpinned."""
    with _kept_lock:
        ring = _kept_ring.pop() if _kept_ring else None
    if ring is not None and ring.shape != shape:
        _get_cudart().unregister(ring.data_ptr())
        ring = None
    return ring


def _registered_ring(nbuf: int, chunk_bytes: int) -> torch.Tensor | None:
    """Ordinary memory on 2 MiB boundaries, advised to use huge pages, pinned with cudaHostRegister: 8.5 ms
    for 48 MiB on the H200 where 4 KiB pages took 14-25 ms (as many page faults, and a page list, 512x shorter)."""
    raw = torch.empty(nbuf * chunk_bytes + _PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % _PAGE
    ring = raw[skip : skip + nbuf * chunk_bytes].view(nbuf, chunk_bytes)
    _advise_huge_pages(ring.data_ptr(), ring.nbytes)
    try:
        _get_cudart().pin(ring.data_ptr(), ring.nbytes, flags=_PORTABLE)  # written by the CPU: not read-only
    except PinError as exc:
        warn_once(f"pinning the staging buffers failed ({exc}); allocating pinned memory instead")
        return None
    return ring


def _advise_huge_pages(ptr: int, nbytes: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(ptr, nbytes, _MADV_HUGEPAGE)  # (a hint: where transparent huge pages are off, nothing changes)
    except (OSError, AttributeError):
        pass


def _stream_through(ring: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, cursor: _Cursor, threads: int) -> None:
    nbuf, chunk_bytes = ring.shape
    stream = _side_stream(dst)
    pending: deque[tuple[Any, int, int, int]] = deque()  # (fill future, slot, lo, hi) in DMA order

    def fill(slot: int, lo: int, hi: int, free: Any) -> None:
        if free is not None:
            free.synchronize()  # the GPU has finished reading this buffer (releases the GIL)
        ring[slot, : hi - lo].copy_(src[lo:hi])

    def submit(slot: int, free: Any) -> None:
        rng = cursor.take_front(chunk_bytes)
        if rng is not None:
            pending.append((pool.submit(fill, slot, *rng, free), slot, *rng))

    with ThreadPoolExecutor(threads, thread_name_prefix="rzc-stage") as pool:
        try:
            for slot in range(nbuf):
                submit(slot, None)
            with torch.cuda.stream(stream):
                while pending:
                    fut, slot, lo, hi = pending.popleft()
                    fut.result()
                    dst[lo:hi].copy_(ring[slot, : hi - lo], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    submit(slot, event)
        finally:
            stream.synchronize()  # the ring may be unpinned and freed only after its last DMA
    torch.cuda.current_stream(dst.device).wait_stream(stream)
