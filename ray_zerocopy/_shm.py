"""Copy-on-write views of shared memory: the layer under the backends.

Ray maps its object store shared and writable in every worker, so a tensor viewing it directly
would let one actor's in-place write change the weights of every actor on the node. A CPU load
therefore maps the pages it needs a second time, ``MAP_PRIVATE``, from the file behind Ray's
mapping (the store's tmpfs file, opened through the raylet's file descriptor, since it is
unlinked): reads share the node's one copy, and a write copies only the pages it touches into the
writer's private memory. That is what ``torch.load(mmap=True)`` and transformers'
``from_pretrained`` give for files: a model may update a buffer in its forward, be fine-tuned,
``load_state_dict``-ed, and nobody else sees a changed byte.

Each load gets a mapping of its own, unmapped when its last tensor goes: a page written through
one load can never show up in another. Where no such mapping can be made (not Linux, ``/proc``
restricted), the bytes are copied once into private memory, and one log line says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
from typing import Any, Iterator, NamedTuple

import torch

from ray_zerocopy import _procmaps
from ray_zerocopy._log import warn_once

STORE_MARKER = "plasma"  # in the /proc/self/maps path of Ray's object store (and of its fallback files)
_PROCMAP_QUERY = 0xC0686611  # _IOWR('f', 17, struct procmap_query): Linux 6.11+


class Vma(NamedTuple):
    """One mapping of this process, as ``/proc/self/maps`` describes it."""

    start: int
    end: int
    target: bool  # a writable shared mapping whose path holds the marker
    file: tuple[int, int, int, int]  # (device major, minor, inode, file offset of ``start``)
    path: str

    def offset(self, addr: int) -> int:
        """Where address ``addr`` of this mapping lies in its file."""
        return self.file[3] + addr - self.start


class _Query(ctypes.Structure):  # struct procmap_query of <linux/fs.h>
    _fields_ = ([(n, ctypes.c_uint64) for n in ("size", "query_flags", "query_addr", "vma_start", "vma_end",
                                                "vma_flags", "vma_page_size", "vma_offset", "inode")]
                + [(n, ctypes.c_uint32) for n in ("dev_major", "dev_minor", "vma_name_size", "build_id_size")]
                + [(n, ctypes.c_uint64) for n in ("vma_name_addr", "build_id_addr")])


_query: list = []  # [pid, fd of its /proc/self/maps, _Query, name buffer]; [None] where PROCMAP_QUERY fails


def vma_of(addr: int, marker: str = STORE_MARKER) -> Vma | None:
    """The mapping holding ``addr`` (None: unmapped or no /proc). One ``PROCMAP_QUERY`` ioctl (a few
    microseconds); where the kernel lacks it, a scan of ``/proc/self/maps`` (a millisecond or more)."""
    if _query != [None]:
        try:
            if not _query or _query[0] != os.getpid():  # (a forked child must not ask about its parent)
                name = ctypes.create_string_buffer(4096)
                fd = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
                _query[:] = [os.getpid(), fd, _Query(size=ctypes.sizeof(_Query)), name]
            _, fd, q, name = _query
            q.query_addr, q.vma_name_size, q.vma_name_addr = addr, len(name), ctypes.addressof(name)
            fcntl.ioctl(fd, _PROCMAP_QUERY, q)
            path = name.value.decode(errors="replace")
            target = q.vma_flags & 10 == 10 and marker in path  # writable, shared
            return Vma(q.vma_start, q.vma_end, target, (q.dev_major, q.dev_minor, q.inode, q.vma_offset), path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            _query[:] = [None]
    try:
        for m in _procmaps.read():
            if m.start <= addr < m.end:
                target = m.shared_writable and marker in m.path
                return Vma(m.start, m.end, target, (*m.dev, m.inode, m.offset), m.path)
    except OSError:  # no /proc: nothing is known to be shared
        pass
    return None


_paths: dict[tuple[int, int, int], str] = {}  # (device, inode) -> a path that opens that file here


def _raylet_pids() -> Iterator[str]:
    """The raylets on this machine, this worker's own first (the object store lives in the raylet)."""
    own = os.environ.get("RAY_RAYLET_PID")
    if own:
        yield own
    for pid in _listdir("/proc"):
        if pid.isdigit() and pid != own:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "raylet":
                        yield pid
            except OSError:
                pass


def _same_file(path: str, key: tuple[int, int, int]) -> bool:
    try:
        st = os.stat(path)  # (follows a /proc/<pid>/fd link without opening what it points to)
    except OSError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == key


def _file_path(vma: Vma) -> str | None:
    """A path that opens the file behind ``vma``: its own path where it still names that file (a
    transport's file on disk), else the raylet's descriptor of it (Ray unlinks the store's file)."""
    key = vma.file[:3]
    path = _paths.get(key)
    if path is not None and _same_file(path, key):
        return path
    own = vma.path.removesuffix(" (deleted)")
    fds = (f"/proc/{pid}/fd/{fd}" for pid in _raylet_pids() for fd in _listdir(f"/proc/{pid}/fd"))
    for path in itertools.chain([own], fds):
        if path and _same_file(path, key):
            _paths[key] = path
            return path
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class _PrivateMap(mmap.mmap):
    """A private copy-on-write mapping; ``keep`` holds what pins its pages (Ray pins an object while
    a buffer of it lives, and must not reuse the pages while they are mapped here)."""

    keep: Any


def aligned_copy(addr: int, nbytes: int, align: int = 64) -> tuple[bytearray, int]:
    """A private copy of the ``nbytes`` at ``addr``, and where they start in it: at the same address modulo
    ``align`` as the original (a bytearray itself is only 16-byte aligned, and CPU kernels round differently
    for operands at other alignments: a copy must not change a model's outputs)."""
    buf = bytearray(nbytes + align)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    skip = (addr - base) % align
    ctypes.memmove(base + skip, addr, nbytes)
    return buf, skip


def private_buffer(lo: int, nbytes: int, keep: object, marker: str = STORE_MARKER) -> tuple[Any, int] | None:
    """A writable buffer private to this load over the ``nbytes`` at address ``lo``, and where ``lo`` is in it.

    Where those bytes lie in a writable shared mapping of ``marker`` (Ray's object store), the buffer is
    a copy-on-write mapping of the same pages: no copy, and a write changes only this buffer. None where
    they do not (private memory already: views of it are safe as they are). Where no copy-on-write
    mapping can be made, a private copy of the bytes (and one log line).

    Args:
        lo: address of the first byte.
        nbytes: how many bytes (more than 0).
        keep: what keeps those bytes where they are (Ray's buffer of the object), held as long as the mapping.
        marker: a substring of the shared mapping's path.

    Returns:
        ``(buffer, offset of lo in it)``, or None.
    """
    vma = vma_of(lo, marker)
    if vma is None or not vma.target or lo + nbytes > vma.end:
        return None
    start = vma.offset(lo)
    skip = start % mmap.ALLOCATIONGRANULARITY
    path = _file_path(vma)
    try:
        if path is None:
            raise OSError(errno.EACCES, f"no path here opens the file behind {vma.path!r} (is /proc restricted?)")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)  # (a descriptor number the raylet closed and reused since it was looked up)
            if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) != vma.file[:3]:
                _paths.pop(vma.file[:3], None)
                raise OSError(errno.ESTALE, f"{path} no longer opens the file behind {vma.path!r}")
            buf = _PrivateMap(fd, skip + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=start - skip)
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        warn_once(f"cannot map shared weights copy-on-write here ({exc}); every load takes a "
                  "private copy of them instead (correct, but not shared)")
        return aligned_copy(lo, nbytes)
    buf.keep = keep
    return buf, skip


class PrivateViews(dict):
    """Tensors by name, every one already private to this load (copy-on-write views made by
    :func:`~ray_zerocopy.backend.tensors_in_buffer` or ``tensors_in_arrays``, or private memory):
    :func:`private_views` returns them as they are, without looking at each."""


def private_views(tensors: dict[str, torch.Tensor], marker: str = STORE_MARKER) -> dict[str, torch.Tensor]:
    """The same tensors, none of them writing into shared memory: those in a writable shared mapping of
    ``marker`` re-pointed at a copy-on-write mapping of their storage (:func:`private_buffer`).

    Same bytes, shapes, strides and ties (tensors of one storage stay views of one storage), no copy.
    What a load does to a backend's CPU tensors (a third-party backend may return plain views of Ray's
    store); the built-in helpers return :class:`PrivateViews`, passed through at no cost.
    """
    if type(tensors) is PrivateViews:
        return tensors
    storages: dict[int, torch.UntypedStorage | None] = {}  # by old data pointer: the new storage, or None (keep)
    out = dict(tensors)
    for name, t in tensors.items():
        if not (t.is_cpu and t.nbytes):
            continue
        old = t.untyped_storage()
        if old.data_ptr() not in storages:
            found = private_buffer(old.data_ptr(), old.nbytes(), old, marker)
            storages[old.data_ptr()] = None if found is None else torch.frombuffer(
                found[0], dtype=torch.uint8, count=old.nbytes(), offset=found[1]).untyped_storage()
        new = storages[old.data_ptr()]
        if new is not None:
            out[name] = torch.empty(0, dtype=t.dtype).set_(new, t.storage_offset(), t.shape, t.stride())
    return out
