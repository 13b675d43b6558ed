"""The lifecycle of the library's detached helper actors: the share_gpu holder (``gpu_share.py``), the GPU
copier (``gpu_copier.py``) and the keeper of a ModelRef pickled outside Ray (``keeper.py``).

Each is a detached actor in namespace ``ray_zerocopy``, named after what it holds, started by whichever
process needs it first (:func:`start_detached`; two that race get the same one). A watcher thread asks
the actor every few seconds whether it may let go (:meth:`Detached._let_go`, which also frees what it
holds); once it may, the actor ends itself, and Ray frees its name for the next one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "ray_zerocopy"


def start_detached(cls: Any, name: str, *args: Any, on_this_node: bool = True) -> tuple[Any, bool]:
    """The detached actor ``name`` (of the ``ray.remote`` class ``cls``, started with ``args``, pinned to this
    node unless ``on_this_node=False``), and whether it was started now (False: it existed)."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE), False
    except ValueError:
        pass
    options: dict[str, Any] = dict(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached")  # (two
    if on_this_node:  # may start it at once: get_if_exists gives both the same one)
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return cls.options(**options).remote(*args), True


class Detached:
    """Base class of a detached helper actor: call :meth:`_watch_every` at the end of ``__init__``; the actor
    exits once :meth:`_let_go` returns True."""

    def _watch_every(self, poll_s: float) -> None:
        threading.Thread(target=self._watch, args=(poll_s,), daemon=True).start()

    def _let_go(self) -> bool:
        """Whether the actor is no longer needed; if so, it has freed what it held (called every poll)."""
        raise NotImplementedError

    def _watch(self, poll_s: float) -> None:
        while True:
            time.sleep(poll_s)
            if self._let_go():
                ray.get_runtime_context().current_actor.shutdown.remote()  # (exit_actor works only in a method)
                return

    def shutdown(self) -> None:
        ray.actor.exit_actor()  # a detached actor ends itself; Ray frees its name for the next one
