"""The readers/writer gate of a loaded model: calls hold its weights (:func:`hold_weights`), an update
(``update.py``) waits for them and holds new calls back while it swaps, so no call sees two versions."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import torch


def unwrapped(model: Any) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the module it compiled


class Gate:
    """Many calls hold the weights at once; an update waits for them, and new calls wait for the update."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.readers = 0
        self.updating = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.updating)
            self.readers += 1
        try:
            yield
        finally:
            with self.cond:
                self.readers -= 1
                self.cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.updating)
            self.updating = True  # (new calls wait from now: an update is not starved by a stream of calls)
            self.cond.wait_for(lambda: self.readers == 0)
        try:
            yield
        finally:
            with self.cond:
                self.updating = False
                self.cond.notify_all()


_gates: weakref.WeakKeyDictionary[Any, Gate] = weakref.WeakKeyDictionary()
_pinned_gates: dict[int, tuple[Any, Gate]] = {}  # objects that take no weak reference (or no hash): kept
_gates_lock = threading.Lock()


def gate_of(obj: Any) -> Gate:
    obj = unwrapped(obj)
    with _gates_lock:
        try:
            return _gates.setdefault(obj, Gate())
        except TypeError:
            return _pinned_gates.setdefault(id(obj), (obj, Gate()))[1]


def hold_weights(model: Any) -> contextlib.AbstractContextManager[None]:
    """Keep the weights of ``model`` (or a pipeline) from changing while the block runs.

    An update of the same object (``update_model_in_actor(model, ...)``, ``update_pipeline_in_actor(pipe, ...)``)
    waits until every block that holds it has ended, and blocks that start meanwhile wait until the update
    is done: a call inside the block sees one version only. Needed only where calls run in threads next to an
    update (Ray Serve's sync methods, actors with ``max_concurrency`` > 1); a plain Ray actor runs one method
    at a time. With ``share_gpu=True`` a threaded call outside the block may also read the old device copy
    after the update has let it go (a CUDA error), so there every threaded call must hold it. Blocks do not
    wait for each other. Do not update the model from inside its own block (it would wait for itself).

    Args:
        model: the object that updates are applied to (the loaded model, its ``torch.compile`` wrapper, or
            the pipeline).

    Returns:
        A context manager.

    Example:
        >>> with hold_weights(self.model):  # doctest: +SKIP
        ...     out = self.model.generate(ids)
    """
    return gate_of(model).reading()
