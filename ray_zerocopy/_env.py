"""Numbers read from environment variables (docs/configuration.md lists every variable the library reads)."""

from __future__ import annotations

import os

from ray_zerocopy.errors import EnvVarError


def env_number(name: str, default: float) -> float:
    """``$name`` as a number >= 0, or ``default`` where it is unset or empty.

    Raises:
        EnvVarError: it is set to something else.
    """
    raw = os.environ.get(name) or ""
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # (also NaN)
        raise EnvVarError(name, raw, "a number >= 0")
    return value
