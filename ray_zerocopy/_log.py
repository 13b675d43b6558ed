"""The package's logger, and warnings logged once per process and cause (not once per load of 100 actors)."""

from __future__ import annotations

import logging

log = logging.getLogger("ray_zerocopy")
_said: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("ray_zerocopy: %s", message)
