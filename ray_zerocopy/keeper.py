"""A ModelRef pickled outside Ray (Ray Serve's ``.bind(...)``) travels by name, not by ObjectRef.

Ray pins every ObjectRef that is pickled outside its own serialization (``cloudpickle.dumps``,
which Ray Serve applies to a deployment's ``.bind(...)`` arguments) for the rest of the life of
the process that pickled it: the weights would stay in the object store after ``serve.shutdown()``
or a redeploy, for as long as the driver runs. So a :class:`~ray_zerocopy.model_ref.ModelRef` pickled
that way is pickled as its uid (no ObjectRef), and a small keeper actor per model holds the real
ModelRef. Unpickling it (a replica's constructor arguments) asks the keeper for the ModelRef (an
ordinary Ray borrow: the keeper returns it) and the keeper counts the calling actor as a user.

Lifetimes: the keeper is detached (no CPU reserved, named ``rzc-keeper-<uid>`` in namespace
``ray_zerocopy``). It holds the ModelRef while a driver or task that pickled it still holds its ModelRef
(each such process pins it once, and unpins when its ModelRef is collected) or an actor that
unpickled or pickled it is alive (checked every ``POLL_S``), or while a Serve deployment whose replicas
loaded it still exists and may load it again (none alive: they all died and Serve starts new ones, or it
scaled to zero; or one appeared less than ``REPLICA_START_S`` ago). Then it lets go and exits, and Ray
frees the weights when the last replica holding them is gone. A deployment deleted, or one whose
replicas have run that long without loading it (redeployed with another model), does not hold it.
A replica that restarts (or a new one when autoscaling up) while it holds loads as usual; the weights'
owner is still the process that prepared the model, which must outlive the deployment. A config
deploy (``serve deploy``) prepares in Serve's build task: Ray keeps that worker while its objects are
referenced, and its keeper waits up to ``FIRST_USE_S`` for the first replica.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import ray

from ray_zerocopy._detached import NAMESPACE, Detached, start_detached
from ray_zerocopy._env import env_number

POLL_S = 1.0
SERVE_REPLICA = "SERVE_REPLICA::"  # Serve names a replica actor SERVE_REPLICA::<app>#<deployment>#<id>
REPLICA_START_S = 60.0  # a replica that has not loaded the model this long after it appeared does not use it
GRACE_S = 5.0  # a new keeper waits this long for its first pin before it may exit
FIRST_USE_S = env_number("RAY_ZEROCOPY_KEEPER_FIRST_USE_S", 600.0)  # pinned from a task: its users come later

_kept: dict[str, Any] = {}  # uid -> keeper handle, for the ModelRefs this process pinned
_lock = threading.Lock()


def keeper_name(uid: str) -> str:
    return f"rzc-keeper-{uid}"


@ray.remote(num_cpus=0, max_restarts=0)
class _Keeper(Detached):
    """Holds one ModelRef while a pinning process or a user actor needs it, then exits."""

    def __init__(self, model_ref: Any, grace_s: float) -> None:
        self.ref, self.pins, self.grace_s = model_ref, 0, grace_s
        self.users: set[str] = set()  # actor IDs
        self.deployments: set[tuple[str, str]] = set()  # (app, deployment) of the Serve replicas among them
        self.seen: dict[str, float] = {}  # Serve replica actor name -> when this keeper first saw it
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self._watch_every(POLL_S)

    def pin(self, delta: int, actor_id: str | None = None) -> int:
        """A process that pickled the ModelRef holds it: an actor counts as a user (until it dies)."""
        with self.lock:
            if actor_id:
                self.users.add(actor_id)
            else:
                self.pins += delta
            return self.pins

    def fetch(self, actor_id: str | None, deployment: tuple[str, str] | None = None) -> Any:
        """The ModelRef (the caller borrows its ObjectRefs), None once let go; an actor caller counts as a
        user, a Serve replica's deployment is remembered."""
        with self.lock:
            if actor_id and self.ref is not None:
                self.users.add(actor_id)
                self.deployments.update([deployment] if deployment else [])
                self.grace_s = min(self.grace_s, GRACE_S)  # (the first user came)
            return self.ref

    def state(self) -> dict:
        with self.lock:
            return {"pins": self.pins, "users": sorted(self.users)}

    def _let_go(self) -> bool:
        users = {a for a in list(self.users) if _actor_alive(a)}
        with self.lock:
            self.users &= users
            if self.pins > 0 or self.users or time.monotonic() - self.started < self.grace_s:
                return False
            deployments = set(self.deployments)
        if self._restarting(deployments):
            return False
        with self.lock:
            if self.pins > 0 or self.users:  # (one came meanwhile)
                return False
            self.ref = None  # the last reference this keeper holds: the weights can go
        return True

    def _restarting(self, deployments: set[tuple[str, str]]) -> bool:
        """True while one of these Serve deployments still exists and its replicas may yet load the model:
        none is alive (they all died and Serve starts new ones, or it scaled to zero), or one appeared less
        than ``REPLICA_START_S`` ago. False once it is deleted (or Serve shut down), or where its replicas
        run that did not load the model (a redeploy with another one)."""
        if not deployments:
            return False
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            apps = serve.status().applications
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
        except (RayServeException, ray.exceptions.RayActorError):  # no Serve (its controller is gone)
            return False
        except Exception:  # (no answer this time: ask again)
            return True
        now = time.monotonic()
        self.seen = {n: self.seen.get(n, now) for n in names if n.startswith(SERVE_REPLICA)}
        for app, name in deployments:
            if app in apps and name in apps[app].deployments:
                ages = [now - t for n, t in self.seen.items() if n.startswith(f"{SERVE_REPLICA}{app}#{name}#")]
                if not ages or min(ages) < REPLICA_START_S:
                    return True
        return False

def _actor_alive(actor_id: str) -> bool:
    try:
        info = ray._private.state.actors(actor_id=actor_id)
    except Exception:  # GCS unreachable for a moment: keep the user
        return True
    return bool(info) and info.get("State") != "DEAD"


def keep(model_ref: Any) -> str:
    """Hand ``model_ref`` to its keeper (started once per model) and pin it until ``model_ref`` is collected here.

    Args:
        model_ref: a :class:`~ray_zerocopy.model_ref.ModelRef` being pickled outside Ray's serialization.

    Returns:
        Its key (its uid, and its index in a group), which is pickled in its place (:func:`restore`
        turns it back into the ModelRef).
    """
    key = model_ref.uid if model_ref.member is None else f"{model_ref.uid}.{model_ref.member}"  # (one per model of a group)
    with _lock:
        if key not in _kept:
            actor_id = ray.get_runtime_context().get_actor_id()  # a replica that pickles its args again
            in_task = actor_id is None and ray._private.worker.global_worker.mode == ray.WORKER_MODE
            keeper, _ = start_detached(_Keeper, keeper_name(key), model_ref, FIRST_USE_S if in_task else GRACE_S,
                                       on_this_node=False)  # (a task: Serve's build of a config deploy)
            ray.get(keeper.pin.remote(1, actor_id))
            _kept[key] = keeper
            if actor_id is None:  # (an actor stops counting when it dies: its finalizer may never run)
                weakref.finalize(model_ref, _unpin, key)
    return key


def _unpin(uid: str) -> None:
    with _lock:
        keeper = _kept.pop(uid, None)
    if keeper is not None and ray.is_initialized():
        try:
            keeper.pin.remote(-1)
        except Exception:  # interpreter or Ray shutting down: the keeper notices its pinner is gone
            pass


def restore(uid: str) -> Any:
    """Unpickle a ModelRef pickled outside Ray: fetch it from its keeper; the calling actor counts as a user.

    Raises:
        WeightsLostError: the keeper is gone (every process that held the ModelRef dropped it and
            no actor that loaded it is alive), or Ray is not running here.
    """
    from ray_zerocopy.errors import WeightsLostError

    try:
        keeper = ray.get_actor(keeper_name(uid), namespace=NAMESPACE)
        model_ref: Any = ray.get(keeper.fetch.remote(ray.get_runtime_context().get_actor_id(), _serve_deployment()))
    except Exception as exc:  # no such actor (ValueError), it died (RayActorError), Ray not started, ...
        raise WeightsLostError(exc) from exc
    if model_ref is None:
        raise WeightsLostError(RuntimeError(f"the keeper of model {uid} let go of it (it is exiting)"))
    return model_ref


def _serve_deployment() -> tuple[str, str] | None:
    """(app, deployment) where this process is a Serve replica (its actor's name says: Serve sets the
    replica context only after it unpickled the constructor's arguments)."""
    name = ray.get_runtime_context().get_actor_name() or ""
    parts = name[len(SERVE_REPLICA):].rsplit("#", 2) if name.startswith(SERVE_REPLICA) else []
    return (parts[0], parts[1]) if len(parts) == 3 else None


def pickled_out_of_band() -> bool:
    """True while something outside Ray's serialization (plain ``cloudpickle.dumps``) is pickling."""
    if not ray.is_initialized() or ray.util.client.ray.is_connected():
        # (Ray Client pickles call arguments with its own pickler, which carries the ObjectRefs to the server:
        # a keeper started from inside that pickling would wait on the client itself, for ever)
        return False
    context = ray._private.worker.global_worker.get_serialization_context()
    return not context.is_in_band_serialization()
