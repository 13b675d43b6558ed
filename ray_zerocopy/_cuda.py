"""The fast host-to-device path: one large buffer from shared memory to a GPU near the PCIe limit.

Why this exists: ``tensor.to("cuda")`` from pageable memory (Ray's object store is pageable
shared memory) makes the CUDA driver bounce every byte through a small pinned buffer of its
own, on one thread: 5.5-7.5 GB/s on an H100, where pinned memory reaches 51-55 GB/s. Two
routes reach pinned speed without a second full host copy:

- ``register``: pin the object store's pages in place (``cudaHostRegister``, read-only flag),
  chunk by chunk in a few worker threads, and start each chunk's DMA as soon as it is pinned.
  No staging memory at all.
- ``staged``: a small ring of pinned staging buffers that worker threads fill (a CPU copy
  releases the GIL) while the GPU copies the previous ones. Bounded extra host memory.

``auto`` uses ``register`` and falls back to ``staged`` (then ``plain``) with one log line if
pinning fails; the route, thread count and chunk size can be overridden by environment
variables (read on every call, so a Ray ``runtime_env`` can set them per actor).
"""

from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

log = logging.getLogger("ray_zerocopy")

ROUTE_ENV = "RAY_ZEROCOPY_H2D_ROUTE"  # auto | register | staged | plain
THREADS_ENV = "RAY_ZEROCOPY_H2D_THREADS"
CHUNK_ENV = "RAY_ZEROCOPY_H2D_CHUNK_MB"
ROUTES = ("auto", "register", "staged", "plain")
MIN_FAST_BYTES = 8 << 20  # below this one plain copy is as quick as setting up threads and pins
STAGING_BUFFERS = 2  # per thread: one being filled while the GPU drains the other
_READ_ONLY = 8  # cudaHostRegisterReadOnly: we only read, and Ray may map the store read-only
_PAGE = 2 << 20  # chunk edges on 2 MiB boundaries, so no two registrations share a page
_warned: set[str] = set()


class PinError(RuntimeError):
    """cudaHostRegister refused a range (already pinned, unsupported memory, limits)."""


def settings(threads: int | None = None, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(worker threads, chunk bytes): explicit values, else the environment, else the defaults.

    Defaults: ``min(8, cpu_count)`` threads (the copy is memory-bound and short: a burst of a few
    threads during the load is what makes it fast) and 32 MiB chunks.
    """
    threads = threads or int(os.environ.get(THREADS_ENV, 0)) or min(8, os.cpu_count() or 1)
    chunk_bytes = chunk_bytes or int(float(os.environ.get(CHUNK_ENV, 0)) * (1 << 20)) or (32 << 20)
    return max(1, threads), max(_PAGE, chunk_bytes // _PAGE * _PAGE)


def copy_to_device(
    buf: torch.Tensor,
    device: torch.device,
    *,
    route: str | None = None,
    threads: int | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Copy a contiguous 1-D uint8 CPU tensor to a CUDA device by the fastest route that works.

    Args:
        buf: the bytes (typically a view of Ray's object store).
        device: a CUDA device of this process.
        route: ``auto`` (default, or ``$RAY_ZEROCOPY_H2D_ROUTE``), ``register``, ``staged`` or ``plain``.
        threads: worker threads for pinning / staging (default ``$RAY_ZEROCOPY_H2D_THREADS`` or min(8, cores)).
        chunk_bytes: bytes per pinned chunk or staging buffer (default ``$RAY_ZEROCOPY_H2D_CHUNK_MB`` or 32 MiB).

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
    threads, chunk_bytes = settings(threads, chunk_bytes)
    if route in ("auto", "register"):
        try:
            _register_copy(buf, dst, threads, chunk_bytes)
            return dst
        except PinError as exc:
            _log_once(f"pinning the buffer in place failed ({exc}); copying through pinned staging buffers")
    try:
        _staged_copy(buf, dst, threads, chunk_bytes)
    except RuntimeError as exc:  # pinned staging memory could not be allocated (memlock limits)
        _log_once(f"pinned staging failed ({exc}); using a plain pageable copy")
        dst.copy_(buf)
    return dst


def _log_once(message: str) -> None:
    if message not in _warned:  # one line per process and cause, not one per load of 100 actors
        _warned.add(message)
        log.warning("ray_zerocopy: %s", message)


def _chunks(base: int, n: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) offsets covering [0, n); inner edges sit on absolute multiples of chunk_bytes."""
    edges = [0]
    nxt = (base // chunk_bytes + 1) * chunk_bytes - base
    while nxt < n:
        edges.append(nxt)
        nxt += chunk_bytes
    edges.append(n)
    return list(zip(edges[:-1], edges[1:]))


# ------------------------------------------------------------------ cudart through ctypes


class _Cudart:
    """cudaHostRegister/Unregister and cudaGetLastError from the libcudart torch already loaded.

    ctypes releases the GIL during each call, so several threads can pin at once.
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

    def pin(self, ptr: int, size: int) -> None:
        err = self.register(ptr, size, _READ_ONLY)
        if err:
            self.last_error()  # clear this thread's sticky "last error" so no later torch call trips on it
            raise PinError(f"cudaHostRegister: {self.error_name(err).decode()} ({err})")


_cudart: _Cudart | None = None


def _loaded_library(stem: str) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(maxsplit=1)[-1]
            name = path.rsplit("/", 1)[-1]
            if name.startswith(stem) and ".so" in name:  # libcudart.so.13, or a wheel's libcudart-<hash>.so.12
                return path
    return None


def _get_cudart() -> _Cudart:
    global _cudart
    if _cudart is None:
        _cudart = _Cudart()
    return _cudart


# ------------------------------------------------------------------ the two fast routes


def _register_copy(src: torch.Tensor, dst: torch.Tensor, threads: int, chunk_bytes: int) -> None:
    """Pin chunks in place in worker threads; the main thread queues each chunk's DMA once pinned."""
    cudart = _get_cudart()
    base = src.data_ptr()
    chunks = _chunks(base, src.numel(), chunk_bytes)
    stream = _side_stream(dst)

    def pin(lo: int, hi: int) -> None:
        torch.cuda.set_device(dst.device)  # the runtime's current device is per thread
        cudart.pin(base + lo, hi - lo)

    with ThreadPoolExecutor(min(threads, len(chunks)), thread_name_prefix="rzc-pin") as pool:
        pins = [pool.submit(pin, lo, hi) for lo, hi in chunks]
        try:
            with torch.cuda.stream(stream):
                for (lo, hi), fut in zip(chunks, pins):
                    fut.result()
                    dst[lo:hi].copy_(src[lo:hi], non_blocking=True)
        finally:
            stream.synchronize()  # no DMA may read a page after it is unpinned
            for fut in pins:
                fut.cancel()  # after a failure: pins that have not started never will
            done = [base + lo for (lo, _), fut in zip(chunks, pins) if _pinned(fut)]
            list(pool.map(cudart.unregister, done))
    torch.cuda.current_stream(dst.device).wait_stream(stream)


def _pinned(fut: Future) -> bool:
    return not fut.cancelled() and fut.exception() is None  # waits for a running pin: nothing stays pinned


def _side_stream(dst: torch.Tensor) -> torch.cuda.Stream:
    """A stream for the copies that first waits for the current one (dst's memory may have just been
    freed by work still queued there)."""
    stream = torch.cuda.Stream(dst.device)
    stream.wait_stream(torch.cuda.current_stream(dst.device))
    return stream


def _staged_copy(src: torch.Tensor, dst: torch.Tensor, threads: int, chunk_bytes: int) -> None:
    """Worker threads fill a ring of pinned buffers; the GPU copies each one as soon as it is full."""
    chunks = _chunks(src.data_ptr(), src.numel(), chunk_bytes)
    nbuf = min(len(chunks), STAGING_BUFFERS * threads)
    ring = torch.empty((nbuf, chunk_bytes), dtype=torch.uint8, pin_memory=True)
    stream = _side_stream(dst)

    def fill(i: int, free: Any) -> None:
        if free is not None:
            free.synchronize()  # the GPU has finished reading this buffer (releases the GIL)
        lo, hi = chunks[i]
        ring[i % nbuf, : hi - lo].copy_(src[lo:hi])

    with ThreadPoolExecutor(min(threads, nbuf), thread_name_prefix="rzc-stage") as pool:
        fills = {i: pool.submit(fill, i, None) for i in range(nbuf)}
        with torch.cuda.stream(stream):
            for i, (lo, hi) in enumerate(chunks):
                fills.pop(i).result()
                dst[lo:hi].copy_(ring[i % nbuf, : hi - lo], non_blocking=True)
                if i + nbuf < len(chunks):
                    event = torch.cuda.Event()
                    event.record(stream)
                    fills[i + nbuf] = pool.submit(fill, i + nbuf, event)
        stream.synchronize()
    torch.cuda.current_stream(dst.device).wait_stream(stream)
