"""Dtype names: how a dtype travels in a payload (a string, stable across torch versions, unlike numpy dtypes)."""

from __future__ import annotations

import functools

import torch

from ray_zerocopy.errors import PayloadError


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (stable across torch versions, unlike numpy dtypes)."""
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)  # (called per tensor on a load's hot path)
def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` (the one place a dtype name is resolved); raises
    :class:`~ray_zerocopy.errors.PayloadError` (a ``ValueError``) for names this torch does not know."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PayloadError(None, f"unknown torch dtype {name!r} (torch {torch.__version__})",
                           "use a dtype name this torch has, e.g. 'float32' or 'bfloat16'")
    return dtype
