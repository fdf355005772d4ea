"""Finding plugins and what they register.

Built-in plugins are plain modules listed in :data:`BUILTIN_PLUGINS`; others
come from the ``dqr`` entry-point group. Everything is loaded lazily, once,
on first use -- never as a side effect of importing dqr.

(Not named ``plugins.py``: in an editable install such a module would shadow
the ``dqr.plugins`` package.)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel

from dqr import hookspecs
from dqr.errors import PluginError

#: Built-in plugins, registered under these names.
BUILTIN_PLUGINS = (
    "dqr.plugins.testpacs.memory",
    "dqr.plugins.dimse",
    "dqr.plugins.dicomweb",
    "dqr.plugins.archive",
    "dqr.plugins.destinations",
    "dqr.plugins.xnat_relabel",
    "dqr.plugins.series_filter",
    "dqr.plugins.testpacs.mockpacs",
    "dqr.plugins.local_executor",
    "dqr.plugins.queue_executor",
)
ENTRY_POINT_GROUP = "dqr"

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every plugin loaded."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _build_manager()
        return _manager


def _build_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("dqr")
    manager.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(name), name=name)
    # Entry points are registered under "<distribution>:<entry point>" rather
    # than pluggy's load_setuptools_entrypoints, which silently skips a name
    # already taken: a site plugin must never vanish or replace a built-in
    # unnoticed. Name clashes of what plugins *register* are checked below.
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist else "?"
        plugin_name = f"{dist}:{entry_point.name}"
        if manager.has_plugin(plugin_name):
            continue  # the same distribution found twice on sys.path
        try:
            plugin = entry_point.load()
        except Exception as exc:  # noqa: BLE001 - report which plugin is broken
            raise PluginError(f"plugin {plugin_name} ({entry_point.value}) failed to load: {exc}") from exc
        manager.register(plugin, name=plugin_name)
    return manager


def reset() -> None:
    """Forget loaded plugins (tests that install plugins use this)."""
    global _manager
    with _lock:
        _manager = None
        _registries.clear()


@dataclass(frozen=True)
class Registered:
    """A type a plugin registered by name: a backend, a destination or an
    executor, with the pydantic model that validates its config section."""

    name: str
    plugin: str
    factory: Any
    config_model: type[BaseModel]


#: Kept for plugins that imported it: every registered type now has a config model.
BackendType = Registered


#: hook name -> {registered name -> record}, filled on first use
_registries: dict[str, dict[str, Any]] = {}


def _registry(hook_name: str, make: Any) -> dict[str, Any]:
    """Call each implementation of a ``register`` hook with a callback that
    knows which plugin is registering, so that clashes name both plugins."""
    with _lock:
        if hook_name in _registries:
            return _registries[hook_name]
    manager = get_plugin_manager()
    found: dict[str, Any] = {}
    for impl in getattr(manager.hook, hook_name).get_hookimpls():

        def register(name: str, *args: Any, _plugin: str = impl.plugin_name, **kwargs: Any) -> None:
            if name in found:
                raise PluginError(
                    f"{hook_name[13:-1]} type {name!r} is registered by two plugins: "
                    f"{found[name].plugin} and {_plugin}"
                )
            found[name] = make(name, _plugin, *args, **kwargs)

        impl.function(register=register)
    with _lock:
        return _registries.setdefault(hook_name, found)


def _maker(kind: str, base_name: str, required: bool):
    """A ``make`` for :func:`_registry` that checks the config model
    subclasses ``dqr.config.<base_name>``; where it is optional, a type
    registered without one gets that base (which has only ``type:``)."""

    def make(name: str, plugin: str, factory: Any, config_model: type[BaseModel] | None = None) -> Registered:
        import dqr.config

        base = getattr(dqr.config, base_name)
        if config_model is None and not required:
            config_model = base
        if not (isinstance(config_model, type) and issubclass(config_model, base)):
            raise PluginError(f"plugin {plugin}: the config model of {kind} {name!r} must subclass dqr.config.{base_name}")
        return Registered(name, plugin, factory, config_model)

    return make


def backend_types() -> dict[str, Registered]:
    """Every registered backend type, by the name used as ``type:`` under ``sources:``."""
    return _registry("dqr_register_backends", _maker("backend", "SourceConfig", required=True))


def destination_types() -> dict[str, Registered]:
    """Every registered destination type, by the name used as ``destination.type``."""
    return _registry("dqr_register_destinations", _maker("destination", "DestinationConfig", required=False))


def executor_types() -> dict[str, Registered]:
    """Every registered executor, by the name used as ``executor:`` (or ``executor.type``)."""
    return _registry("dqr_register_executors", _maker("executor", "ExecutorConfig", required=False))


def plugin_names() -> list[str]:
    """Names of the loaded plugins, built-ins first."""
    return [name for name, _ in get_plugin_manager().list_name_plugin()]
