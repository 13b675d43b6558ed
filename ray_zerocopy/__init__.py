"""ray_zerocopy: N Ray actors on a node share one copy of a PyTorch model's weights.

Importing this package imports the built-in backends' modules (a first load in a fresh actor then
has nothing left to import); third-party plugins (entry points) are discovered on first use.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ray_zerocopy.actor import (
    ModelRef,
    hold_weights,
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
    update_model_in_actor,
    update_pipeline_in_actor,
)
from ray_zerocopy.backend import (
    Backend,
    Payload,
    array_offsets,
    arrays_to_device,
    buffer_to_device,
    dtype_from_name,
    dtype_name,
    put_joined,
    quiet_readonly,
    spec_of,
    tensor_from_bytes,
    tensor_to_bytes,
    tensors_in_arrays,
    tensors_in_buffer,
    to_device,
)
from ray_zerocopy.errors import (
    AdaptedDtypeError,
    BackendArgumentError,
    BackendMismatchError,
    CheckpointError,
    CheckpointMismatchError,
    DeviceError,
    DuplicateBackendError,
    EnvVarError,
    FormatVersionError,
    HiddenModelError,
    InvalidModelRefError,
    InvalidRegistrationError,
    LoadDtypeError,
    MethodNotFoundError,
    NoModelsError,
    NotAModuleError,
    OtherSessionError,
    PayloadError,
    PipelineRefsError,
    PipelineRefsTypeError,
    PrepareNodeError,
    RayZeroCopyError,
    SharedWeightWriteError,
    ShimAttributeError,
    SkeletonDamagedError,
    SkeletonImportError,
    SkeletonLoadError,
    UnexpectedArgumentError,
    UnknownBackendError,
    UnsupportedModelError,
    UpdateMismatchError,
    UpdateNotSupportedError,
    WeightsLostError,
)
from ray_zerocopy.hookspecs import hookimpl, hookspec
from ray_zerocopy.invoke import rewrite_pipeline
from ray_zerocopy.plugins import import_builtins
from ray_zerocopy.tensor_adapters import TensorAdapter

__version__ = "0.1.0"

__all__ = [
    "AdaptedDtypeError",
    "TensorAdapter",
    "Backend",
    "BackendArgumentError",
    "BackendMismatchError",
    "CheckpointError",
    "CheckpointMismatchError",
    "DeviceError",
    "DuplicateBackendError",
    "EnvVarError",
    "FormatVersionError",
    "HiddenModelError",
    "InvalidModelRefError",
    "UnexpectedArgumentError",
    "SkeletonDamagedError",
    "SkeletonImportError",
    "SkeletonLoadError",
    "PipelineRefsTypeError",
    "PipelineRefsError",
    "OtherSessionError",
    "InvalidRegistrationError",
    "LoadDtypeError",
    "MethodNotFoundError",
    "ModelRef",
    "NoModelsError",
    "NotAModuleError",
    "Payload",
    "PayloadError",
    "PrepareNodeError",
    "RayZeroCopyError",
    "SharedWeightWriteError",
    "ShimAttributeError",
    "UnknownBackendError",
    "UnsupportedModelError",
    "UpdateMismatchError",
    "UpdateNotSupportedError",
    "WeightsLostError",
    "__version__",
    "array_offsets",
    "arrays_to_device",
    "buffer_to_device",
    "dtype_from_name",
    "dtype_name",
    "hookimpl",
    "hookspec",
    "hold_weights",
    "load_model_in_actor",
    "load_pipeline_in_actor",
    "prepare_model_for_actors",
    "put_joined",
    "quiet_readonly",
    "rewrite_pipeline",
    "rewrite_pipeline_for_actors",
    "spec_of",
    "tensor_from_bytes",
    "tensor_to_bytes",
    "tensors_in_arrays",
    "tensors_in_buffer",
    "to_device",
    "update_model_in_actor",
    "update_pipeline_in_actor",
]


def _map_builtin_backends() -> None:
    """Make the top-level ``backends/`` of a source checkout importable as ``ray_zerocopy.backends``.

    An installed wheel has it inside the package (setuptools' ``package-dir`` mapping in pyproject.toml);
    a checkout has it beside the package, which Python alone would not find. This covers ``PYTHONPATH=.``,
    an editable install, Ray workers started from the repository root, and a non-editable install run
    from there (whose ``ray_zerocopy`` is then the checkout's).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    beside = os.path.join(os.path.dirname(here), "backends")
    if "ray_zerocopy.backends" in sys.modules or os.path.isdir(os.path.join(here, "backends")):
        return  # (an installed wheel)
    spec = importlib.util.spec_from_file_location("ray_zerocopy.backends", os.path.join(beside, "__init__.py"),
                                                  submodule_search_locations=[beside])
    if spec is None or spec.loader is None or not os.path.isfile(os.path.join(beside, "__init__.py")):
        return  # (then importing a built-in backend fails with Python's own ModuleNotFoundError)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["backends"] = module  # (what the import system does for a submodule)


_map_builtin_backends()
import_builtins()  # (not lazily: a first load in a fresh actor then has nothing left to import)
