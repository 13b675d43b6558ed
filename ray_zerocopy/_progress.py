"""Progress of long preparations (bytes and rate on stderr, like Hugging Face's loaders); silenced on request.

``prepare_model_for_actors`` shows it for models of ``SHOW_FROM`` bytes or more unless
``progress=False`` or the environment sets ``RAY_ZEROCOPY_PROGRESS=0``. Ray copies an object's
bytes in one call that reports nothing, so a checkpoint is first read through the page cache
in chunks (a bounded buffer, no copy of the model kept) with a live line per chunk; the write
into the object store is then a copy from memory, reported when it is done.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Iterable

SHOW_FROM = 1 << 30  # bytes: smaller models prepare in about a second, a bar would only flicker
CHUNK = 16 << 20
ENV = "RAY_ZEROCOPY_PROGRESS"


def wanted(progress: bool | None, nbytes: int) -> bool:
    """Whether to show progress: ``progress`` if given, else for big models unless the env var says 0."""
    if progress is not None:
        return bool(progress)
    return os.environ.get(ENV, "1") not in ("0", "false", "False", "") and nbytes >= SHOW_FROM


class Progress:
    """One line on ``stream`` per update: ``label: done/total GB [elapsed, rate]``."""

    def __init__(self, label: str, total: int, stream: IO[str] | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self._show("\r")

    def close(self) -> None:
        self._show("\r")
        self.stream.write("\n")
        self.stream.flush()

    def _show(self, end: str) -> None:
        secs = max(time.perf_counter() - self.start, 1e-9)
        pct = 100 * self.done / self.total if self.total else 100
        self.stream.write(f"{end}{self.label}: {pct:3.0f}% {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                          f"[{secs:.1f} s, {self.done / secs / 1e9:.2f} GB/s]")
        self.stream.flush()


def read_through(files: Iterable[str], stream: IO[str] | None = None) -> None:
    """Read ``files`` once in ``CHUNK``-sized pieces into one reused buffer (the page cache keeps
    them for the store's copy), showing bytes and rate as it goes."""
    files = list(files)
    bar = Progress("reading checkpoint", sum(os.path.getsize(f) for f in files), stream)
    buf = bytearray(CHUNK)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                bar.update(n)
    bar.close()


def report_store(nbytes: int, seconds: float, where: str, stream: IO[str] | None = None) -> None:
    """The one line for the copy into the object store."""
    out = stream or sys.stderr
    out.write(f"stored {nbytes / 1e9:.2f} GB in Ray's object store{where} in {seconds:.1f} s "
              f"({nbytes / max(seconds, 1e-9) / 1e9:.2f} GB/s)\n")
    out.flush()
