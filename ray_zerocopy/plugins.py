"""The plugin manager: built-in backends first, then the ``ray_zerocopy`` entry-point group.

Built-in backends are registered exactly like third-party ones (through the
``register_backends`` hook); they are simply not declared as entry points, so a
source checkout works and nothing registers twice. Loading is lazy and happens once
per process; set ``RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points.

A third-party plugin that fails (its entry point does not import, or its hook raises) is
skipped with one :class:`PluginLoadWarning` naming it; the built-in backends and the other
plugins keep working, and ``python -m ray_zerocopy backends`` lists it as broken.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from ray_zerocopy import hookspecs
from ray_zerocopy.backend import Backend
from ray_zerocopy.errors import BackendArgumentError, DuplicateBackendError, InvalidRegistrationError, UnknownBackendError
from ray_zerocopy.tensor_adapters import TensorAdapter, WrapperSubclassAdapter

DISABLE_AUTOLOAD_ENV = "RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD"
BUILTINS = {  # backend name -> plugin module
    "object_store": "ray_zerocopy.backends.object_store",
    "safetensors": "ray_zerocopy.backends.safetensors_blob",
    "packed": "ray_zerocopy.backends.packed",
}
BUILTIN_PLUGINS = (*BUILTINS.values(), "ray_zerocopy.tensor_adapters")
DEFAULT_BACKEND = "object_store"


@dataclass(frozen=True)
class BackendInfo:
    """Where a registered backend comes from (shown by ``python -m ray_zerocopy backends``)."""

    name: str
    cls: type[Backend]
    plugin: str
    distribution: str  # "name version", or "built-in" / "not installed" when no distribution declares it


@dataclass(frozen=True)
class BrokenPlugin:
    """A third-party plugin that was skipped because it failed to load or to register its backends."""

    plugin: str  # the entry point's name (or the registered plugin's name)
    distribution: str  # "name version" of the distribution declaring it, or "not installed"
    target: str  # what the entry point points at ("module:attr")
    error: str  # "ExceptionType: message"


class PluginLoadWarning(RuntimeWarning):
    """A third-party ray_zerocopy plugin failed and was skipped (the built-in backends still work)."""


_lock = threading.RLock()  # (re-entrant: a broken hook is recorded while backend_infos holds it)
_pm: pluggy.PluginManager | None = None
_backends: dict[str, BackendInfo] | None = None
_instances: dict[str, Backend] = {}
_entry_points: dict[int, tuple[str, str]] = {}  # id(plugin) -> (its distribution "name version", entry point value)
_broken: dict[str, BrokenPlugin] = {}
_adapters: list[TensorAdapter] | None = None


def import_builtins() -> None:
    """Import the built-in backends' modules (registering nothing: :func:`plugin_manager` does that)."""
    for module_name in BUILTIN_PLUGINS:
        importlib.import_module(module_name)


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
                _load_entry_points(pm)
            _pm = pm
        return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every ``ray_zerocopy`` entry point, one by one: one that fails is skipped and reported
    (pluggy's ``load_setuptools_entrypoints`` stops at the first failure, taking the built-ins with it)."""
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        dist = f"{ep.dist.metadata['Name']} {ep.dist.version}" if ep.dist is not None else "not installed"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            _skip(BrokenPlugin(ep.name, dist, ep.value, f"{type(exc).__name__}: {exc}"))
            continue
        _entry_points[id(plugin)] = (dist, ep.value)


def _skip(broken: BrokenPlugin) -> None:
    """Record a broken plugin and warn once (per process) naming it, its error and the env switch."""
    with _lock:
        if broken.plugin in _broken:
            return
        _broken[broken.plugin] = broken
    where = f" (entry point {broken.plugin} = {broken.target})" if broken.target else ""
    warnings.warn(
        f"ray_zerocopy: skipping plugin {broken.plugin!r} of {broken.distribution}{where}: {broken.error}. "
        "The built-in backends and other plugins still work. Fix: repair or uninstall that distribution, "
        f"or set {DISABLE_AUTOLOAD_ENV}=1 to load no third-party plugin.",
        PluginLoadWarning, stacklevel=3,
    )


def broken_plugins() -> list[BrokenPlugin]:
    """The third-party plugins skipped in this process because they failed (see :class:`BrokenPlugin`)."""
    plugin_manager()
    backend_infos()  # a hook that raises is found here
    return list(_broken.values())


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object (module or instance with hookimpls) in this process.

    Use it when entry points are off; remember that actors are other processes and
    must register the same plugin (for example in a Ray ``worker_process_setup_hook``).
    """
    global _backends, _adapters
    plugin_manager().register(plugin, name=name)
    with _lock:
        _backends = _adapters = None


def backend_infos() -> dict[str, BackendInfo]:
    """Every registered backend by name, with the plugin and distribution that provide it."""
    global _backends
    pm = plugin_manager()
    with _lock:
        if _backends is None:
            found: dict[str, BackendInfo] = {}
            for impl in pm.hook.register_backends.get_hookimpls():
                builtin = impl.plugin_name in BUILTIN_PLUGINS
                unknown = ("not installed", "")
                dist, target = ("built-in", "") if builtin else _entry_points.get(id(impl.plugin), unknown)
                try:
                    new = _call_hook(impl, dist)
                except DuplicateBackendError:
                    raise
                except Exception as exc:
                    if id(impl.plugin) not in _entry_points:  # a built-in, or registered by hand: the caller's error
                        raise
                    _skip(BrokenPlugin(impl.plugin_name, dist, target, f"{type(exc).__name__}: {exc}"))
                    continue
                for info in new:
                    if info.name in found:
                        raise DuplicateBackendError(info.name, found[info.name].plugin, info.plugin)
                    found[info.name] = info
            _backends = found
        return _backends


def _call_hook(impl: pluggy.HookImpl, dist: str) -> list[BackendInfo]:
    """What one plugin's ``register_backends`` registers (all or nothing: a hook that raises adds none)."""
    new: list[BackendInfo] = []

    def register(cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)) or not getattr(cls, "name", None):
            raise InvalidRegistrationError(impl.plugin_name, cls)
        if any(info.name == cls.name for info in new):
            raise DuplicateBackendError(cls.name, impl.plugin_name, impl.plugin_name)
        new.append(BackendInfo(cls.name, cls, impl.plugin_name, dist))

    impl.function(register=register)
    return new


def tensor_adapters() -> list[TensorAdapter]:
    """Every registered tensor adapter, in the order they are tried: the built-in ones, the plugins',
    then PyTorch's wrapper-subclass protocol (so a plugin can take over a type that implements it)."""
    global _adapters
    pm = plugin_manager()
    with _lock:
        if _adapters is None:
            found: dict[str, TensorAdapter] = {}
            owners = {WrapperSubclassAdapter.name: "ray_zerocopy.tensor_adapters"}
            for impl in reversed(pm.hook.register_tensor_adapters.get_hookimpls()):  # (pluggy: last registered first)
                new: list[Any] = []
                try:
                    impl.function(register=new.append)
                    for cls in new:
                        if not (isinstance(cls, type) and issubclass(cls, TensorAdapter)) or not getattr(cls, "name", None):
                            raise InvalidRegistrationError(impl.plugin_name, cls, "TensorAdapter")
                except Exception as exc:
                    if id(impl.plugin) not in _entry_points:  # a built-in, or registered by hand: the caller's error
                        raise
                    dist, target = _entry_points[id(impl.plugin)]
                    _skip(BrokenPlugin(impl.plugin_name, dist, target, f"{type(exc).__name__}: {exc}"))
                    continue
                for cls in new:
                    if cls.name in owners:
                        raise DuplicateBackendError(cls.name, owners[cls.name], impl.plugin_name, kind="tensor adapter")
                    owners[cls.name] = impl.plugin_name
                    found[cls.name] = cls()
            _adapters = [*found.values(), WrapperSubclassAdapter()]
        return _adapters


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


def check_backend_arg(backend: object, function: str, position: int, original: str | None = None,
                      optional: bool = False) -> None:
    """Refuse a ``backend=`` that is not a backend name: a bool, a non-string, or a device name (the
    original ray_zerocopy took ``use_fast_load`` / ``device`` where ours takes ``backend``).

    Raises:
        BackendArgumentError: naming ``function``, the argument's ``position`` and the ``original`` one there.
    """
    if backend is None and optional:  # the load functions: None means the ref's backend
        return
    if isinstance(backend, str):
        if backend in BUILTINS:
            return
        try:
            torch.device(backend)
        except (RuntimeError, ValueError):
            return  # a name, maybe of a third-party backend (checked where it is looked up)
    raise BackendArgumentError(backend, function, position, original, optional)
