"""Guard zero-copy weights against in-place writes.

A model loaded on the CPU holds views of the node's shared object store, which Ray maps
writable: an in-place write (``weight.add_(...)``, a BatchNorm in train mode) would change
the weights of every actor on the node. The guard stops that three ways:

* :func:`readonly_views` points every weight at a read-only twin of Ray's mapping (the same
  shared pages mapped a second time with ``mremap``, then ``mprotect``-ed once while still
  empty), so a write faults (the writing process dies; the shared copy stays intact) instead
  of corrupting other actors. Ray's own mapping is never touched, and the twin is kept: a
  reload maps nothing and touches no page table (an ioctl or two find the mapping);
* a forward pre-hook on every norm layer with shared running statistics raises before a
  train-mode call writes them (these kernels do not bump the version counter);
* a forward hook on the root compares every weight's version counter after each call and
  raises :class:`~ray_zerocopy.errors.SharedWeightWriteError` naming module and tensor (the
  only check where no twin can be made: not Linux, or a backend's copy outside shared memory).

Models that must write load with ``private_copy=True``: the actor gets its own copy.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import weakref
from typing import Callable, NamedTuple, Sequence

import torch

from ray_zerocopy._log import log
from ray_zerocopy.errors import SharedWeightWriteError

_PROT_READ, _MREMAP_MAYMOVE = 1, 1
_PROCMAP_QUERY = 0xC0686611  # _IOWR('f', 17, struct procmap_query): Linux 6.11+
_libc = None


class _Vma(NamedTuple):
    start: int
    end: int
    target: bool  # a writable shared mapping whose path holds the marker
    file: tuple  # which file, where: a mapping replaced at the same addresses differs here


class _Query(ctypes.Structure):  # struct procmap_query of <linux/fs.h>
    _fields_ = ([(n, ctypes.c_uint64) for n in ("size", "query_flags", "query_addr", "vma_start", "vma_end",
                                                "vma_flags", "vma_page_size", "vma_offset", "inode")]
                + [(n, ctypes.c_uint32) for n in ("dev_major", "dev_minor", "vma_name_size", "build_id_size")]
                + [(n, ctypes.c_uint64) for n in ("vma_name_addr", "build_id_addr")])


_query: list = []  # [pid, fd of its /proc/self/maps, _Query, name buffer]; [None] where PROCMAP_QUERY fails


def _vma(addr: int, marker: str) -> _Vma | None:
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
            target = q.vma_flags & 10 == 10 and marker in name.value.decode(errors="replace")  # writable, shared
            return _Vma(q.vma_start, q.vma_end, target, (q.dev_major, q.dev_minor, q.inode, q.vma_offset))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            _query[:] = [None]
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms, offset, dev, inode, _ = line.split(" ", 5)
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    target = perms[1] == "w" and perms[3] == "s" and marker in line
                    major, minor = (int(x, 16) for x in dev.split(":"))
                    return _Vma(lo, hi, target, (major, minor, int(inode), int(offset, 16)))
    except OSError:  # no /proc: no read-only twin, the version checks still run
        pass
    return None


class _Twin:
    """A read-only second mapping of the pages of one shared mapping, and how many storages use it."""

    def __init__(self, vma: _Vma) -> None:
        self.vma, self.users, self.addr = vma, 0, _make_twin(vma.start, vma.end)

    def release(self) -> None:
        self.users -= 1

    def holds(self, ptr: int) -> bool:
        return bool(self.addr) and self.addr <= ptr < self.addr + self.vma.end - self.vma.start


_twins: dict[tuple[int, int], _Twin] = {}  # by the (start, end) of the mapping it twins


def _drop_stale_twins(marker: str) -> None:
    """Unmap the twins nobody uses whose mapping is gone: Ray unmaps a fallback allocation once
    unused and may map another at the same addresses later (a twin would show stale pages)."""
    for key, twin in list(_twins.items()):
        if not twin.users and _vma(twin.vma.start, marker) != twin.vma:
            if twin.addr:
                _libc.munmap(twin.addr, twin.vma.end - twin.vma.start)
            del _twins[key]


def _twin_of(marker: str, lo: int, hi: int) -> _Twin | None:
    """The read-only twin of the writable shared mapping of ``marker`` holding ``[lo, hi)``; None for
    private memory, read-only mappings (twins among them), or where no twin can be made.
    Twins are kept for reuse: a reload maps nothing and touches no page table."""
    vma = _vma(lo, marker)
    if vma is None or not vma.target or hi > vma.end:
        return None
    twin = _twins.get(vma[:2])
    if twin is None or twin.vma != vma:  # (a replaced mapping still in use cannot be: Ray pins it)
        twin = _twins[vma[:2]] = _Twin(vma)
    return twin if twin.addr else None


def _make_twin(lo: int, hi: int) -> int | None:
    """Map the pages of the shared mapping ``[lo, hi)`` a second time, read-only; its address or None."""
    global _libc
    addr = None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mremap.restype = ctypes.c_void_p
            _libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int)
            _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            _libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        # old_size 0 on a shared mapping: a new mapping of the same pages (mremap(2)); still empty,
        # so making it read-only walks no page table
        addr = _libc.mremap(lo, 0, hi - lo, _MREMAP_MAYMOVE)
        if addr in (None, ctypes.c_void_p(-1).value):
            addr = None
        elif _libc.mprotect(addr, hi - lo, _PROT_READ) != 0:
            _libc.munmap(addr, hi - lo)
            addr = None
    except (OSError, AttributeError):  # no libc/mremap (not Linux)
        pass
    if addr is None:
        log.warning("ray_zerocopy: cannot map shared weights read-only here; in-place writes are "
                    "detected after each call (version counters) instead of refused")
    return addr


def readonly_storage(lo: int, nbytes: int, keep: object, marker: str = "plasma") -> torch.UntypedStorage | None:
    """A storage over the ``nbytes`` at address ``lo`` seen through the read-only twin of their shared
    mapping, holding ``keep`` (what keeps those bytes alive: Ray pins an object while its buffer lives).
    None where the bytes are not in a writable shared mapping of ``marker`` or no twin can be made."""
    _drop_stale_twins(marker)
    twin = _twin_of(marker, lo, lo + nbytes) if nbytes else None
    return None if twin is None else _twin_storage(twin, lo, nbytes, keep)


def _twin_storage(twin: _Twin, lo: int, nbytes: int, keep: object) -> torch.UntypedStorage:
    raw = (ctypes.c_char * nbytes).from_address(twin.addr + lo - twin.vma.start)
    raw.keep = keep
    twin.users += 1
    weakref.finalize(raw, twin.release)
    return torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()


class TwinViews(dict):
    """Tensors by name that all lie in read-only twins (what ``tensors_in_buffer`` and ``tensors_in_arrays``
    give where they can): :func:`readonly_views` returns them as they are, without looking at each. A
    backend that adds other tensors to one returns a plain ``dict`` of it instead."""


def readonly_views(tensors: dict[str, torch.Tensor], marker: str = "plasma") -> dict[str, torch.Tensor]:
    """The same tensors, ready for the write guard: those in a writable shared mapping of ``marker``
    re-pointed at its read-only twin, each with a version counter of its own.

    Same bytes, shapes, strides and ties, no copy. The re-pointed tensors of one mapping are views
    of one storage over their span. Tensors already in a twin are left as they are (a write into
    them faults). Of the others (private memory, other read-only mappings), views of one base are
    re-made on the same memory: views share their base's version counter, so a write could not be
    traced to its tensor.
    """
    if type(tensors) is TwinViews:
        return tensors
    _drop_stale_twins(marker)
    by_storage: dict[int, list[str]] = {}
    for name, t in tensors.items():
        if t.is_cpu and t.nbytes:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    spans: dict[int, tuple[_Twin, list[str]]] = {}  # by the mapping they lie in
    private: list[str] = []
    for ptr, names in by_storage.items():
        if any(twin.holds(ptr) for twin in _twins.values()):
            continue
        twin = _twin_of(marker, ptr, ptr + tensors[names[0]].untyped_storage().nbytes())
        if twin is None:
            private += names
        else:
            spans.setdefault(twin.vma.start, (twin, []))[1].extend(names)
    out = dict(tensors)
    for twin, names in spans.values():
        olds = [tensors[n].untyped_storage() for n in names]
        lo = min(s.data_ptr() for s in olds) // 64 * 64  # a whole number of elements from here to every tensor
        span = _twin_storage(twin, lo, max(s.data_ptr() + s.nbytes() for s in olds) - lo, olds)
        for name in names:
            t = tensors[name]
            offset, rest = divmod(t.data_ptr() - lo, t.element_size())
            if rest:  # an element not aligned to its size keeps its old, writable view
                private.append(name)
            else:
                out[name] = torch.empty(0, dtype=t.dtype).set_(span, offset, t.shape, t.stride())
    views: dict[int, list[str]] = {}  # (no Counter: its first use in a process costs a millisecond of abc checks)
    for name in private:
        if out[name]._base is not None:
            views.setdefault(id(out[name]._base), []).append(name)
    for names in views.values():
        for name in names if len(names) > 1 else ():
            t = out[name]
            out[name] = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return out


def _owner(name: str, model: torch.nn.Module) -> tuple[str, str]:
    module = name.rpartition(".")[0]
    return module, type(model.get_submodule(module)).__name__


def _own_version_counters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Give every CPU weight its own version counter (views of one buffer share one) so a write
    names its tensor; same memory, ties kept (one new object per old one). Returns them by name."""
    fresh: dict[int, torch.Tensor] = {}
    out = []
    for prefix, module in model.named_modules():  # a module reachable twice is one object: one visit
        for slots in (module._parameters, module._buffers):
            for key, t in slots.items():
                if t is None or t.device.type != "cpu":
                    continue
                if id(t) not in fresh:
                    new = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    fresh[id(t)] = new
                    out.append((f"{prefix}.{key}" if prefix else key, new))
                slots[key] = fresh[id(t)]
    return out


class _Guard:
    """Per-model state: every weight with the version it had when loaded."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], restore: Callable[[], None] | None = None) -> None:
        self.versions = [(name, t, t._version) for name, t in tensors]
        self.restore = restore  # puts the shared weights back after a write that could not be refused

    def __deepcopy__(self, memo: dict) -> _Guard:  # a deep copy of the model is private memory: nothing to guard
        return _Guard([])

    def __reduce__(self) -> tuple:  # likewise a pickled-and-loaded copy
        return _Guard, ([],)

    def refuse_train_mode(self, module: torch.nn.Module, args: object) -> None:
        """Pre-hook of norm layers: their train-mode kernels update running stats without a version bump."""
        if module.training and self.versions:
            name = module._rzc_name
            raise SharedWeightWriteError(name, type(module).__name__, f"{name}.running_mean" if name else "running_mean",
                                         "was called in train mode, which updates its running statistics in place")

    def check(self, model: torch.nn.Module, *_: object) -> None:
        for name, t, version in self.versions:
            if t._version != version:
                if self.restore is not None:
                    self.restore()
                    self.versions = [(n, x, x._version) for n, x, _ in self.versions]
                raise SharedWeightWriteError(*_owner(name, model), name, "changed it in place")


def norm_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the norm layers whose running statistics a train-mode call would update in place."""
    return tuple(name for name, m in model.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats)


def guard_model(
    model: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]] | None = None, norms: Sequence[str] | None = None,
    restore: Callable[[], None] | None = None,
) -> torch.nn.Module:
    """Report in-place writes into ``model``'s shared CPU weights; returns ``model``.

    Called by :func:`~ray_zerocopy.load_model_in_actor` unless ``private_copy=True``, after
    :func:`readonly_views` made the shared weights read-only. The cost per call: one
    version-counter read per tensor (measured by ``python -m ray_zerocopy bench``).

    Args:
        model: a model rebuilt from shared-memory views.
        tensors: ``(name, tensor)`` of every weight object in the model, each with a version counter of
            its own unless it lies in a read-only twin (``rebuild_model(..., placed=...)`` after
            :func:`readonly_views` gives them); found and re-made when omitted.
        norms: :func:`norm_layers` of the model (``ModelRef.norm_layers``); found when omitted.
        restore: for weights shared in device memory (which cannot be made read-only): called to
            put them back when a call wrote into them, before the error is raised. Every tensor
            is then checked, not only CPU ones.

    Returns:
        The same model, with hooks attached.

    Raises:
        SharedWeightWriteError: later, from a call that wrote into a weight.

    Example:
        >>> model = guard_model(rebuild_model(skeleton, readonly_views(tensors), layouts))  # doctest: +SKIP
    """
    tensors = _own_version_counters(model) if tensors is None else tensors
    guard = model._rzc_guard = _Guard([(name, t) for name, t in tensors if restore or t.is_cpu], restore)
    model.register_forward_hook(guard.check, always_call=True)  # also after an exception
    for name in norm_layers(model) if norms is None else norms:
        sub = model.get_submodule(name)
        sub._rzc_name = name
        sub.register_forward_pre_hook(guard.refuse_train_mode)
    return model


def private_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Writable private copies of CPU tensors (strides kept): for models that must write their weights."""
    return {k: t.clone() if t.device.type == "cpu" else t for k, t in tensors.items()}
