"""Hugging Face shortcut: prepare a saved model folder without building the model in the driver.

``prepare_pretrained(folder)`` builds the model's skeleton from its ``config.json`` with
``accelerate.init_empty_weights()`` (parameters on the meta device, buffers real, ties tied) and
prepares it from the folder's safetensors files: the driver never holds the weights.
Needs ``transformers`` and ``accelerate`` (imported only here).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ray_zerocopy.backend import dtype_from_name
from ray_zerocopy.errors import CheckpointError
from ray_zerocopy.model_ref import ModelRef
from ray_zerocopy.plugins import DEFAULT_BACKEND
from ray_zerocopy.prepare import prepare_model_for_actors


def build_skeleton(path: str | os.PathLike, model_class: Any = None, *, dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a Hugging Face folder with its parameters on the meta device (no weight is read).

    Args:
        path: a folder holding ``config.json`` (what ``save_pretrained`` writes).
        model_class: a transformers model class or Auto class (``AutoModelForCausalLM``, ``LlamaForCausalLM``);
            default: the class the config names in ``architectures`` (the one that saved it).
        dtype: the parameters' dtype; default: the config's (``dtype`` / ``torch_dtype``), else float32.
        trust_remote_code: passed to ``AutoConfig.from_pretrained``.

    Returns:
        The skeleton in eval mode, tied weights tied, buffers (rotary tables, position ids) real.

    Raises:
        ImportError: transformers or accelerate is not installed.
        CheckpointError: no ``model_class`` given and the config names no architecture transformers has.

    Example:
        >>> skeleton = build_skeleton("llama/", AutoModelForCausalLM)  # doctest: +SKIP
    """
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_class = model_class or _class_of(config, path)
    dtype = dtype or _config_dtype(config)
    with init_empty_weights():
        if hasattr(model_class, "from_config"):  # an Auto class
            model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()  # transformers ties at load time; save_pretrained stored the tied weight once
    return model.eval()


def _class_of(config: Any, path: str | os.PathLike) -> Any:
    import transformers

    names = getattr(config, "architectures", None) or []
    found = [getattr(transformers, n) for n in names if hasattr(transformers, n)]
    if not found:
        raise CheckpointError(path, f"config.architectures={names!r} names no class of transformers "
                              f"{transformers.__version__}", "pass model_class= (e.g. AutoModelForCausalLM)")
    return found[0]


def _config_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        try:
            dtype = dtype_from_name(dtype)
        except ValueError:  # ("auto", or a name this torch lacks)
            dtype = None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def prepare_pretrained(
    path: str | os.PathLike,
    model_class: Any = None,
    *,
    backend: str = DEFAULT_BACKEND,
    dtype: torch.dtype | None = None,
    node: str | None = None,
    progress: bool | None = None,
    trust_remote_code: bool = False,
    gpu_copiers: bool = False,
    like: ModelRef | None = None,
) -> ModelRef:
    """``prepare_model_for_actors`` for a Hugging Face folder: skeleton from the config, weights from the files.

    Args:
        path: the folder (``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``).
        model_class, dtype, trust_remote_code: as for :func:`build_skeleton`.
        backend, node, progress, gpu_copiers, like: as for :func:`~ray_zerocopy.prepare.prepare_model_for_actors` (with ``node``,
            the owner on that node reads the weights; the config is read here).

    Returns:
        The :class:`~ray_zerocopy.model_ref.ModelRef`, as from ``prepare_model_for_actors``.

    Raises:
        CheckpointError, CheckpointMismatchError, PrepareNodeError: as ``prepare_model_for_actors``.
        ImportError: transformers or accelerate is not installed.

    Example:
        >>> ref = prepare_pretrained("/models/llama-3-8b", AutoModelForCausalLM, backend="packed")  # doctest: +SKIP
        >>> model = load_model_in_actor(ref)  # in each actor  # doctest: +SKIP
    """
    skeleton = build_skeleton(path, model_class, dtype=dtype, trust_remote_code=trust_remote_code)
    return prepare_model_for_actors(skeleton, backend, checkpoint=path, node=node, progress=progress,
                                    gpu_copiers=gpu_copiers, like=like)
