"""The ModelRef: what ``prepare_model_for_actors`` returns and actors load; its ObjectRefs and their lifetime.

A ModelRef is small and picklable, and holding it keeps the weights alive: it holds every ObjectRef of
the backend's payload (found once, in the driver, by :func:`object_refs`). Pickled outside Ray's own
serialization it travels by name through a keeper actor (``keeper.py``). Before a load reads the weights,
:func:`check_tracked` makes sure Ray knows the ObjectRefs' owner (a ref unpickled with plain ``pickle``
would make ``ray.get`` wait forever).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import ray
import torch

from ray_zerocopy import keeper
from ray_zerocopy.backend import Payload
from ray_zerocopy.errors import InvalidModelRefError, OtherSessionError, WeightsLostError


@dataclass(frozen=True)
class ModelRef:
    """A model prepared for sharing: small and picklable; holding it keeps the weights alive.

    Attributes:
        skeleton: the pickled model without tensor data.
        payload: what the backend's ``put`` returned (it holds the ObjectRefs).
        backend: name of the backend that wrote ``payload``.
        format_version: that backend's payload format version.
        nbytes: bytes of unique weight data (tied tensors counted once).
        layouts: (shape, stride) of permuted tensors, stored flat in memory order.
        uid: unique per prepared model (names its GPU holders when actors share a device copy).
        owner: the actor that owns the weights when they were prepared on another node (``node=``);
            holding the ref keeps it alive. ``None`` where the preparing process owns them.
        object_refs: every ObjectRef in ``payload`` (a load checks that Ray tracks them: see
            :func:`check_tracked`).
        gpu_copiers: prepared with ``gpu_copiers=True``: GPU loads are filled by the model's copiers
            (``gpu_copier.py``).
        member: for models of one pipeline that share submodules, prepared together as one
            ``ModuleList``: the index of this model in it (``None`` for a model prepared alone).
        pipeline_attrs: for a model of a pipeline, the names of every model attribute prepared with it by
            ``rewrite_pipeline_for_actors`` (``load_pipeline_in_actor`` checks the refs it is given against them).
        session: the Ray session the weights were put in (a ref from an ended session, or from another
            Ray, cannot be loaded: its objects' owner is unknown there).
    """

    skeleton: bytes = field(repr=False)
    payload: Payload = field(repr=False)
    backend: str
    format_version: int
    nbytes: int
    layouts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict, repr=False)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: Any = field(default=None, repr=False, compare=False)
    object_refs: tuple[ray.ObjectRef, ...] = field(default=(), repr=False)
    member: int | None = None
    gpu_copiers: bool = False
    pipeline_attrs: tuple[str, ...] = ()
    session: str | None = field(default_factory=lambda: current_session(), compare=False)

    def __reduce_ex__(self, protocol: Any) -> Any:
        check_session(self)  # (in the driver, before an actor is started with a ref it cannot load)
        # Pickled outside Ray (Serve's .bind arguments), its ObjectRefs would be pinned for the rest of the
        # pickling process's life: travel by name instead, the keeper holds the refs (see keeper.py).
        if keeper.pickled_out_of_band():
            return keeper.restore, (keeper.keep(self),)
        return super().__reduce_ex__(protocol)

    def __copy__(self) -> ModelRef:
        return self  # immutable (and copying must not start a keeper)

    def __deepcopy__(self, memo: dict) -> ModelRef:
        return self


def object_refs(payload: Payload) -> tuple[ray.ObjectRef, ...]:
    """Every ObjectRef a backend's payload holds, in its attributes, dicts, lists and tuples (found once,
    in the driver). Never by pickling it: Ray pins for good every ObjectRef pickled outside its own
    serialization, so the weights would never be freed."""
    found: list[ray.ObjectRef] = []
    todo, seen = [payload], set()
    while todo:
        obj = todo.pop()
        if isinstance(obj, ray.ObjectRef):
            found.append(obj)
        elif id(obj) not in seen and not isinstance(obj, (str, bytes, int, float, torch.Tensor)):
            seen.add(id(obj))
            if isinstance(obj, dict):
                todo += obj.values()
            elif isinstance(obj, (list, tuple, set, frozenset)):
                todo += obj
            elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
                todo += [getattr(obj, k) for k in _attr_names(obj)]
    return tuple(found)


def _attr_names(obj: object) -> list[str]:
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if hasattr(obj, n)]
    return [n for n in names if not n.startswith("__")]


def current_session() -> str | None:
    """The name of the Ray session this process is connected to (None where Ray is not started here)."""
    node = getattr(ray._private.worker, "_global_node", None)  # (the same session name in the driver and its workers)
    return getattr(node, "session_name", None) if ray.is_initialized() else None


def check_session(ref: ModelRef) -> None:
    """Raise WeightsLostError for a ref prepared in another Ray session than this process's.

    Raises:
        WeightsLostError: with :class:`~ray_zerocopy.errors.OtherSessionError` as its cause.
    """
    here = current_session()
    if ref.session is not None and here is not None and ref.session != here:
        raise WeightsLostError(OtherSessionError(ref.session, here), session=(ref.session, here))


def check_tracked(refs: Sequence[ray.ObjectRef]) -> None:
    """Raise WeightsLostError for an ObjectRef whose owner this process does not know: it was unpickled
    outside Ray (plain pickle), so Ray does not track it and ``ray.get`` would wait forever, freed or not.
    A local lookup (well under a microsecond per ref), no round trip."""
    try:
        core_worker = ray._private.worker.global_worker.core_worker  # type: ignore[attr-defined]  # set by ray.init
    except AttributeError:  # Ray not initialized here (ray.get raises its own error), or a Ray without it
        return
    for ref in refs:
        try:
            core_worker.get_owner_address(ref)
        except ValueError as exc:  # "... a Ray object whose owner is unknown ..."
            raise WeightsLostError(exc, object_ref=ref) from None


def as_model_ref(model_ref: Any) -> ModelRef:
    """``model_ref`` itself, or the ModelRef an ObjectRef points to, checked (see :func:`check_tracked`).

    Raises:
        InvalidModelRefError: it is not a ModelRef.
        WeightsLostError: its ObjectRefs were unpickled outside Ray.
    """
    if isinstance(model_ref, ray.ObjectRef):  # Ray Data passes constructor kwargs unresolved
        check_tracked((model_ref,))
        model_ref = ray.get(model_ref)
    if not isinstance(model_ref, ModelRef):
        raise InvalidModelRefError(model_ref)
    check_session(model_ref)
    check_tracked(model_ref.object_refs)
    return model_ref
