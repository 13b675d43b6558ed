"""The lines of ``/proc/<pid>/maps`` (and the mapping headers of ``smaps``), parsed in one place."""

from __future__ import annotations

from typing import Iterator, NamedTuple


class MapsLine(NamedTuple):
    """One mapping: ``start-end perms offset major:minor inode path``."""

    start: int
    end: int
    perms: str  # "rw-s": readable, writable, (x), shared or private
    offset: int  # file offset of ``start``
    dev: tuple[int, int]  # (major, minor) of the file's device
    inode: int
    path: str  # "" for an anonymous mapping; may end in " (deleted)"

    @property
    def shared_writable(self) -> bool:
        return self.perms[1] == "w" and self.perms[3] == "s"


def parse(line: str) -> MapsLine | None:
    """The mapping a line describes; None for another line (an ``smaps`` field such as ``Pss: 12 kB``)."""
    parts = line.split(maxsplit=5)
    if len(parts) < 5 or "-" not in parts[0] or ":" not in parts[3]:
        return None
    try:
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        return MapsLine(lo, hi, parts[1], int(parts[2], 16), (major, minor), int(parts[4]),
                        parts[5].strip() if len(parts) == 6 else "")
    except ValueError:
        return None


def read(path: str = "/proc/self/maps") -> Iterator[MapsLine]:
    """Every mapping listed in ``path`` (``OSError`` where it cannot be read: not Linux, ``/proc`` restricted)."""
    with open(path) as f:
        for line in f:
            found = parse(line)
            if found is not None:
                yield found
