"""Pluggy markers and hook specifications. Plugins implement these hooks."""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "ray_zerocopy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[type], None]) -> None:
    """Register weight transports: call ``register(BackendClass)`` once per backend.

    Example::

        from ray_zerocopy import Backend, hookimpl

        class MyBackend(Backend):
            name = "my_backend"
            ...

        @hookimpl
        def register_backends(register):
            register(MyBackend)
    """


@hookspec
def register_tensor_adapters(register: Callable[[type], None]) -> None:
    """Register carriers of tensor types that are not plain tensors (quantized weights): call
    ``register(AdapterClass)`` once per ``ray_zerocopy.TensorAdapter`` subclass. Adapters are tried in
    registration order (built-ins first); PyTorch's wrapper-subclass protocol is tried last.

    Example::

        from ray_zerocopy import TensorAdapter, hookimpl

        class MyQuantAdapter(TensorAdapter):
            name = "my_quant"
            ...

        @hookimpl
        def register_tensor_adapters(register):
            register(MyQuantAdapter)
    """
