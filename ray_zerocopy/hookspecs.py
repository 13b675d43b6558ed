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
