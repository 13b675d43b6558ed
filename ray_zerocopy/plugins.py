"""The plugin manager: built-in backends first, then the ``ray_zerocopy`` entry-point group.

Built-in backends are registered exactly like third-party ones (through the
``register_backends`` hook); they are simply not declared as entry points, so a
source checkout works and nothing registers twice. Loading is lazy and happens once
per process; set ``RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from ray_zerocopy import hookspecs
from ray_zerocopy.backend import Backend
from ray_zerocopy.errors import DuplicateBackendError, UnknownBackendError

DISABLE_AUTOLOAD_ENV = "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD"
BUILTINS = {  # backend name -> plugin module
    "object_store": "ray_zerocopy.backends.object_store",
    "safetensors": "ray_zerocopy.backends.safetensors_blob",
    "packed": "ray_zerocopy.backends.packed",
}
BUILTIN_PLUGINS = tuple(BUILTINS.values())


@dataclass(frozen=True)
class BackendInfo:
    """Where a registered backend comes from (shown by ``python -m ray_zerocopy backends``)."""

    name: str
    cls: type[Backend]
    plugin: str
    distribution: str  # "name version", or "built-in" / "not installed" when no distribution declares it


_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_backends: dict[str, BackendInfo] | None = None
_instances: dict[str, Backend] = {}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for module_name in BUILTIN_PLUGINS:
                pm.register(importlib.import_module(module_name), name=module_name)
            if not os.environ.get(DISABLE_AUTOLOAD_ENV):
                pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            _pm = pm
        return _pm


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object (module or instance with hookimpls) in this process.

    Use it when entry points are off; remember that actors are other processes and
    must register the same plugin (for example in a Ray ``worker_process_setup_hook``).
    """
    global _backends
    plugin_manager().register(plugin, name=name)
    with _lock:
        _backends = None


def backend_infos() -> dict[str, BackendInfo]:
    """Every registered backend by name, with the plugin and distribution that provide it."""
    global _backends
    pm = plugin_manager()
    with _lock:
        if _backends is None:
            dists = {id(p): f"{d.project_name} {d.version}" for p, d in pm.list_plugin_distinfo()}
            found: dict[str, BackendInfo] = {}
            for impl in pm.hook.register_backends.get_hookimpls():
                builtin = impl.plugin_name in BUILTIN_PLUGINS
                dist = "built-in" if builtin else dists.get(id(impl.plugin), "not installed")

                def register(cls: type, _plugin: str = impl.plugin_name, _dist: str = dist) -> None:
                    if not (isinstance(cls, type) and issubclass(cls, Backend)) or not getattr(cls, "name", None):
                        raise TypeError(
                            f"plugin {_plugin!r} registered {cls!r}: expected a ray_zerocopy.Backend subclass "
                            "with a `name`. Fix: subclass ray_zerocopy.Backend and set name = '...'."
                        )
                    if cls.name in found:
                        raise DuplicateBackendError(cls.name, found[cls.name].plugin, _plugin)
                    found[cls.name] = BackendInfo(cls.name, cls, _plugin, _dist)

                impl.function(register=register)
            _backends = found
        return _backends


def backend_names() -> list[str]:
    """Names of every registered backend, sorted."""
    return sorted(backend_infos())


def get_backend(name: str) -> Backend:
    """The (cached) backend instance registered as ``name``.

    Raises:
        UnknownBackendError: no plugin in this process registers ``name``.
    """
    backend = _instances.get(name)
    if backend is None and _backends is None and name in BUILTINS:
        # no plugin can take a built-in's name (DuplicateBackendError): an actor loading a built-in
        # needs no entry-point scan, the costliest part of a first load in a fresh process
        found: list[type[Backend]] = []
        importlib.import_module(BUILTINS[name]).register_backends(register=found.append)
        backend = _instances[name] = found[0]()
    if backend is None:
        infos = backend_infos()
        if name not in infos:
            raise UnknownBackendError(name, list(infos))
        backend = _instances[name] = infos[name].cls()
    return backend
