"""Guard the device copy that actors on one GPU share (``share_gpu=True``).

CPU weights need no guard: every load views the shared object store copy-on-write (``_shm.py``),
so a write stays private to the writer. Device memory mapped from another process through CUDA
IPC has no such mapping, so a model loaded with ``share_gpu=True`` shares its parameters only
(buffers are private to each actor: models update them, e.g. LongRoPE's ``inv_freq`` or BatchNorm's
running statistics), and a forward hook compares the parameters' version counters after each call:
a changed one makes the holder copy the stored weights back, and the call raises
:class:`~ray_zerocopy.errors.SharedWeightWriteError` naming the submodule and tensor.
"""

from __future__ import annotations

from typing import Callable

import torch

from ray_zerocopy.errors import SharedWeightWriteError


def _owner(name: str, model: torch.nn.Module) -> tuple[str, str]:
    module = name.rpartition(".")[0]
    return module, type(model.get_submodule(module)).__name__


class _Guard:
    """Per-model state: every shared weight with the version it had when loaded."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], restore: Callable[[], None] | None = None) -> None:
        self.versions = [(name, t, t._version) for name, t in tensors]
        self.restore = restore  # puts the shared weights back after a write

    def __deepcopy__(self, memo: dict) -> _Guard:  # a deep copy of the model is private memory: nothing to guard
        return _Guard([])

    def __reduce__(self) -> tuple:  # likewise a pickled-and-loaded copy
        return _Guard, ([],)

    def reset(self, restore: Callable[[], None] | None) -> None:
        """The watched tensors hold another version now (a live update): compare with their versions from
        here on, and put back that version's weights (``restore``) after a write."""
        self.versions = [(name, t, t._version) for name, t, _ in self.versions]
        self.restore = restore

    def check(self, model: torch.nn.Module, args: object, output: object) -> None:
        for name, t, version in self.versions:
            if t._version != version:
                if self.restore is not None:
                    self.restore()
                    self.versions = [(n, x, x._version) for n, x, _ in self.versions]
                raise SharedWeightWriteError(*_owner(name, model), name, "changed it in place")


def guard_model(
    model: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]], restore: Callable[[], None] | None = None,
) -> torch.nn.Module:
    """Report in-place writes into ``tensors`` (weights of ``model`` shared with other processes).

    The cost per call: one version-counter read per tensor.

    Args:
        model: a model whose weights map memory shared with other actors.
        tensors: ``(name, tensor)`` of the shared weight objects placed in the model.
        restore: called to put the shared weights back when a call wrote into them, before the error.

    Returns:
        The same model, with a forward hook attached.

    Raises:
        SharedWeightWriteError: later, from a call that wrote into a weight.

    Example:
        >>> model = guard_model(model, [("fc.weight", model.fc.weight)], restore)  # doctest: +SKIP
    """
    guard = _Guard(tensors, restore)
    model._rzc_guard = guard  # type: ignore[assignment]  # (torch types Module attributes as Tensor | Module)
    model.register_forward_hook(guard.check, always_call=True)  # also after an exception
    return model
