"""Guard zero-copy weights against in-place writes.

A model loaded on the CPU holds views of the node's shared object store, which Ray maps
writable: an in-place write (``weight.add_(...)``, a BatchNorm in train mode) would change
the weights of every actor on the node. :func:`guard_model` stops that three ways:

* pages that lie wholly inside the weight buffers are made read-only (``mprotect``), so a
  write there faults (the writing process dies; the shared copy stays intact) instead of
  corrupting other actors; the rest (a buffer's first and last partial page, copies that a
  backend made outside shared memory) is covered by the next two checks, and the shared
  partial pages are put back from a private copy (a few KiB) when a write is detected;
* a forward pre-hook on every norm layer with shared running statistics raises before a
  train-mode call writes them (these kernels do not bump the version counter);
* a forward hook on the root compares every weight's version counter after each call and
  raises :class:`~ray_zerocopy.errors.SharedWeightWriteError` naming module and tensor.

Models that must write load with ``private_copy=True``: the actor gets its own copy.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from typing import Iterable

import torch

from ray_zerocopy.errors import SharedWeightWriteError

PAGE = mmap.PAGESIZE
_PROT_READ, _PROT_WRITE = 1, 2
_MERGE_GAP = 64  # Ray aligns arrays in one object to 64 bytes: smaller gaps are padding of that object
_libc = None
_protected: dict[tuple[int, int], int] = {}  # page range -> how many guards hold it read-only now


def _mprotect(ranges: Iterable[tuple[int, int]], prot: int) -> bool:
    """``mprotect`` each page-aligned ``[lo, hi)``; False where the platform cannot (not Linux/libc)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return all(_libc.mprotect(lo, hi - lo, prot) == 0 for lo, hi in ranges)
    except (OSError, AttributeError):
        return False


def shared_mappings(marker: str = "plasma") -> list[tuple[int, int]]:
    """``(start, end)`` of this process's shared mappings whose path contains ``marker`` (Ray's store)."""
    out: list[list[int]] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if marker not in line:  # most of ~1000 lines: skip them before the costly split
                    continue
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1][3] == "s" and marker in parts[5]:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    if out and out[-1][1] == lo:  # our own mprotect splits one mapping into several lines
                        out[-1][1] = hi
                    else:
                        out.append([lo, hi])
    except OSError:  # no /proc: no page protection, the version checks still run
        pass
    return [(lo, hi) for lo, hi in out]


_mappings: dict[str, list[tuple[int, int]]] = {}


def _cached_mappings(marker: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """:func:`shared_mappings`, re-read only when a span lies outside what was read before
    (reading ``/proc/self/maps`` of a Ray worker costs milliseconds; Ray's store stays mapped)."""
    maps = _mappings.get(marker)
    if maps is None or not all(any(a <= lo and hi <= b for a, b in maps) for lo, hi in spans if hi > lo):
        maps = _mappings[marker] = shared_mappings(marker)
    return maps


def split_pages(
    spans: Iterable[tuple[int, int]], mappings: list[tuple[int, int]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(pages, edges)`` of the weight bytes ``spans`` that lie in shared memory.

    Spans closer than 64 bytes are merged (padding between the arrays of one object), so
    small tensors packed together are covered too. ``pages``: whole pages inside a merged
    span (never one that another object, or this process's own future ``ray.put``, could
    share). ``edges``: the rest of each span (at most a partial page at either end).
    """
    merged: list[list[int]] = []
    for lo, hi in sorted(s for s in spans if s[1] > s[0] and any(a <= s[0] and s[1] <= b for a, b in mappings)):
        if merged and lo - merged[-1][1] < _MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    pages, edges = [], []
    for lo, hi in merged:
        first, last = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
        if last > first:
            pages.append((first, last))
            edges += [e for e in ((lo, first), (last, hi)) if e[1] > e[0]]
        else:
            edges.append((lo, hi))
    return pages, edges


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
    """Per-model state: weight versions, shared partial pages, and a copy of their bytes."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], edges: list[tuple[int, int]]) -> None:
        self.versions = [(name, t, t._version) for name, t in tensors]
        self.edges = edges
        self.saved = [ctypes.string_at(lo, hi - lo) for lo, hi in edges]
        # Partial pages are shared with neighbouring objects that this process may write (its own
        # ray.put, task returns): read-only only while the model runs, when nothing else writes.
        self.edge_pages = sorted({(lo // PAGE * PAGE, lo // PAGE * PAGE + PAGE) for lo, _ in edges}
                                 | {((hi - 1) // PAGE * PAGE, (hi - 1) // PAGE * PAGE + PAGE) for _, hi in edges})
        self.running = 0

    def __deepcopy__(self, memo: dict) -> _Guard:  # a deep copy of the model is private memory: nothing to guard
        return _Guard([], [])

    def __reduce__(self) -> tuple:  # likewise a pickled-and-loaded copy
        return _Guard, ([], [])

    def refuse_train_mode(self, module: torch.nn.Module, args: object) -> None:
        """Pre-hook of norm layers: their train-mode kernels update running stats without a version bump."""
        if module.training and self.versions:
            name = module._rzc_name
            raise SharedWeightWriteError(name, type(module).__name__, f"{name}.running_mean" if name else "running_mean",
                                         "was called in train mode, which updates its running statistics in place")

    def enter(self, model: torch.nn.Module, *_: object) -> None:
        if self.edge_pages and not self.running:
            _protect(self.edge_pages)
        self.running += 1

    def exit(self, model: torch.nn.Module, *_: object) -> None:
        self.running -= 1
        if self.edge_pages and not self.running:
            _unprotect(self.edge_pages)
        for name, t, version in self.versions:
            if t._version != version:
                self.restore()
                raise SharedWeightWriteError(*_owner(name, model), name, "changed it in place")

    def restore(self) -> None:
        """Put back shared bytes that a write reached outside the protected pages (between calls)."""
        for (lo, hi), data in zip(self.edges, self.saved):
            if ctypes.string_at(lo, hi - lo) != data:
                ctypes.memmove(lo, data, hi - lo)


def guard_model(
    model: torch.nn.Module, marker: str = "plasma", tensors: list[tuple[str, torch.Tensor]] | None = None
) -> torch.nn.Module:
    """Make ``model``'s shared CPU weights read-only and report in-place writes; returns ``model``.

    Called by :func:`~ray_zerocopy.load_model_in_actor` unless ``private_copy=True``.
    The cost per call: one version-counter read per tensor and two ``mprotect`` calls per
    partial page (measured by ``python -m ray_zerocopy bench``).

    Args:
        model: a model rebuilt from shared-memory views.
        marker: substring of the ``/proc/self/maps`` path of that memory (``Backend.shared_memory_marker``).
        tensors: ``(name, tensor)`` of every weight object in the model, each with a version counter of
            its own (``rebuild_model(..., placed=...)`` makes them); found and re-made when omitted.

    Returns:
        The same model, with hooks attached and its shared pages protected.

    Raises:
        SharedWeightWriteError: later, from a call that wrote into a weight.

    Example:
        >>> model = guard_model(rebuild_model(skeleton, tensors, layouts))  # doctest: +SKIP
    """
    tensors = _own_version_counters(model) if tensors is None else tensors
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for _, t in tensors if t.device.type == "cpu"]
    pages, edges = split_pages(spans, _cached_mappings(marker, spans))
    if pages and _protect(pages):
        # Before the views go (Ray may then reuse these pages for this process's own objects),
        # make them writable again; the finalizer holds the tensors, so they outlive it.
        weakref.finalize(model, _unprotect, pages, [t for _, t in tensors])
    guard = model._rzc_guard = _Guard(tensors, edges)
    model.register_forward_pre_hook(guard.enter)
    model.register_forward_hook(guard.exit, always_call=True)  # also after an exception
    for name, sub in model.named_modules():
        if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            sub._rzc_name = name
            sub.register_forward_pre_hook(guard.refuse_train_mode)
    return model


def _protect(ranges: Iterable[tuple[int, int]]) -> bool:
    """Make ``ranges`` read-only, counting holders (two models may share weights, or nest calls)."""
    fresh = [r for r in ranges if not _protected.get(r)]
    if not _mprotect(fresh, _PROT_READ):
        return False
    for r in ranges:
        _protected[r] = _protected.get(r, 0) + 1
    return True


def _unprotect(ranges: Iterable[tuple[int, int]], *keep_alive: object) -> None:
    """Drop one hold on each range; the last one makes it writable again."""
    for r in ranges:
        _protected[r] -= 1
        if not _protected[r]:
            del _protected[r]
            _mprotect([r], _PROT_READ | _PROT_WRITE)


def private_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Writable private copies of CPU tensors (strides kept): for models that must write their weights."""
    return {k: t.clone() if t.device.type == "cpu" else t for k, t in tensors.items()}
