"""One contiguous buffer in Ray's object store, written from many sources with no copy of the whole.

``ray.put`` of a numpy array copies its bytes once, from the array into the object (its buffer
travels out of band in pickle protocol 5). The one-buffer transports (``packed``, ``safetensors``)
need all tensors in one buffer, which used to mean assembling it in the driver first: a second
full copy of the model in the driver's heap. Here the buffer is described instead as a sequence of
*pieces*, most of them zero-copy views of the tensors themselves (or of a checkpoint file's
pages), and put as one object whose out-of-band buffers are those pieces. Ray lays out an
out-of-band buffer at the next multiple of 64 bytes (8 below 2048 bytes), so pieces whose lengths
are multiples of 64 land back to back: in the object they *are* the one buffer, and
:func:`_join` hands it back as one read-only uint8 array over the object's memory, no copy.
The only bytes copied in the driver are the small glue pieces (a header, the odd bytes between
64-byte boundaries, padding, tensors under 16 KiB): at most 64 bytes per large tensor, and 64 MiB in all.
"""

from __future__ import annotations

import pickle
from typing import Any, Iterable

import numpy as np
import ray

ALIGN = 64  # Ray aligns out-of-band buffers of 2048 bytes or more to 64 bytes (and smaller ones to 8)
SMALL = 16 * 1024  # segments below this are copied into glue pieces: each piece costs a load's ray.get ~1 us
GLUE_BUDGET = 64 * 1024**2  # at most this many bytes copied that way per object (the driver's extra memory)


def pieces(segments: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Cut a stream of 1-D uint8 segments into pieces whose lengths are multiples of 64 (the last
    excepted), so Ray stores them back to back: each large segment a view of itself, neighbouring
    small ones (under ``SMALL``, up to ``GLUE_BUDGET`` in all) copied together into one piece.

    Args:
        segments: the buffer's bytes in order (views of tensors, of file pages, small headers).

    Returns:
        1-D uint8 arrays whose concatenation is the concatenation of ``segments``.
    """
    out: list[np.ndarray] = []
    glue: list[np.ndarray] = []  # bytes that wait for a 64-byte boundary (copied into one small piece)
    held = copied = 0  # bytes in glue; bytes glued so far
    for seg in segments:
        small = len(seg) < SMALL and copied + len(seg) <= GLUE_BUDGET
        if small or len(seg) < ALIGN - held or (held and len(seg) < 2 * ALIGN):
            glue.append(seg)
            held += len(seg)
            copied += len(seg)
            if held % ALIGN == 0 and held >= SMALL:
                out.append(np.concatenate(glue))
                glue, held = [], 0
            continue
        take = -held % ALIGN  # bytes of seg that complete the glue up to a boundary
        if held:
            out.append(np.concatenate([*glue, seg[:take]]))
            glue, held = [], 0
        body = (len(seg) - take) // ALIGN * ALIGN
        if body:
            out.append(seg[take : take + body])  # the bulk: a view, never copied here
        rest = seg[take + body :]
        if len(rest):
            glue, held = [rest], len(rest)
    if held:
        out.append(np.concatenate(glue))
    return out


class _Joined:
    """Pickles as :func:`_join` of its pieces, each an out-of-band buffer (see the module docstring)."""

    def __init__(self, parts: list[np.ndarray], nbytes: int) -> None:
        self.parts = parts
        self.nbytes = nbytes

    def __reduce__(self) -> tuple:
        # (numpy's stubs give ndarray the buffer protocol's __buffer__ only for Python >= 3.12)
        return _join, (self.nbytes, *(pickle.PickleBuffer(p) for p in self.parts))  # type: ignore[arg-type]


def put_joined(segments: Iterable[np.ndarray], **put_kwargs: Any) -> ray.ObjectRef:
    """``ray.put`` of the concatenation of ``segments`` without building it: ``ray.get`` of the result
    is one 1-D read-only uint8 array (zero-copy where Ray laid the pieces back to back).

    Args:
        segments: 1-D uint8 arrays (views; they are read once, by Ray, while it writes the object).
        put_kwargs: passed to ``ray.put`` (e.g. ``_owner``).

    Returns:
        The ObjectRef.
    """
    parts = pieces(segments)
    return ray.put(_Joined(parts, sum(len(p) for p in parts)), **put_kwargs)


def address_of(buf: Any) -> int:
    """Where the bytes of a numpy array or any contiguous buffer start in this process."""
    if not isinstance(buf, np.ndarray):  # (a buffer: Ray gives the object_store transport's as such)
        buf = np.frombuffer(buf, np.uint8)
    return buf.__array_interface__["data"][0]


class _Span:
    """A read-only uint8 array interface over ``nbytes`` from ``addr``; ``keep`` holds the memory."""

    def __init__(self, addr: int, nbytes: int, keep: tuple) -> None:
        self.__array_interface__ = {"data": (addr, True), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        self.keep = keep


def _join(nbytes: int, *bufs: Any) -> np.ndarray:
    """The pieces as one uint8 array: a view over the object's memory where they lie back to back
    (they do in Ray's layout), else a copy (another serializer's layout: correct, not zero-copy).

    Ray writes out-of-band buffers one after the other, in order: where the last piece ends exactly
    ``nbytes`` after the first begins (and a middle one where it should), the pieces fill the span
    with no gap, and the hundreds of pieces between need no look (this runs on every load)."""
    if not bufs:
        return np.empty(0, np.uint8)
    first, last = np.frombuffer(bufs[0], np.uint8), np.frombuffer(bufs[-1], np.uint8)
    start = address_of(first)
    if address_of(last) + len(last) - start == nbytes and address_of(first) + len(first) <= address_of(last):
        return _view(start, nbytes, bufs)
    arrays = [np.frombuffer(b, np.uint8) for b in bufs]
    pos = start
    for a in arrays:
        if address_of(a) != pos:
            return np.concatenate(arrays)
        pos += len(a)
    if pos - start != nbytes:
        raise ValueError(f"joined object holds {pos - start} bytes, expected {nbytes}")
    return _view(start, nbytes, bufs)


def _view(start: int, nbytes: int, bufs: tuple) -> np.ndarray:
    out = np.asarray(_Span(start, nbytes, tuple(bufs)))
    out.flags.writeable = False
    return out
