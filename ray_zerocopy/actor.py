"""Share one copy of a model's weights between many Ray actors (and Ray Data actor pools).

The driver calls :func:`prepare_model_for_actors` once; every actor calls
:func:`load_model_in_actor` with the result and gets the model back in milliseconds,
its CPU weights being views into the node's shared object store. A loaded model takes a new
version's weights in place with :func:`update_model_in_actor` (:func:`update_pipeline_in_actor`). A pipeline holding several
models goes through :func:`rewrite_pipeline_for_actors` and :func:`load_pipeline_in_actor`.

This module is the public face of the actor API; the work is done in ``prepare.py`` (driver side),
``load.py`` (actor side), ``model_ref.py`` (what travels between them) and ``pipeline.py``.
"""

from __future__ import annotations

from ray_zerocopy.gate import hold_weights
from ray_zerocopy.load import load_model_in_actor, resolve_device
from ray_zerocopy.model_ref import ModelRef
from ray_zerocopy.pipeline import load_pipeline_in_actor, rewrite_pipeline_for_actors
from ray_zerocopy.plugins import DEFAULT_BACKEND
from ray_zerocopy.prepare import prepare_model_for_actors
from ray_zerocopy.update import update_model_in_actor, update_pipeline_in_actor

__all__ = [
    "DEFAULT_BACKEND",
    "ModelRef",
    "hold_weights",
    "load_model_in_actor",
    "load_pipeline_in_actor",
    "prepare_model_for_actors",
    "resolve_device",
    "rewrite_pipeline_for_actors",
    "update_model_in_actor",
    "update_pipeline_in_actor",
]
