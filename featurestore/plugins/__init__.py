"""The one extension point: a pluggy plugin manager, the built-ins, and plugins installed with pip.

A plugin is a module (or object) with hook implementations marked by
:data:`hookimpl` (the hooks: :mod:`featurestore.plugins.hookspecs`), made known
through the entry-point group ``featurestore`` of the distribution that ships it::

    [project.entry-points.featurestore]
    colour_moments = "featurestore_colour_moments"

The built-in feature kinds, CNN runtimes and index backends are registered
through the same hooks by the modules in :data:`BUILTINS`. They are imported by
name (as llm loads its default plugins) so that loading them costs nothing: they
import the code they register only when their hooks are called.

:func:`plugin_manager` loads everything once per process; the registries
(:func:`featurestore.features.registry.feature_kinds`, ...) call the hooks each
time they are asked, so a plugin registered later (a test's) is seen at once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from featurestore.errors import FeatureStoreError
from featurestore.plugins import hookspecs

GROUP = "featurestore"
hookimpl = pluggy.HookimplMarker(GROUP)

BUILTINS = (
    "featurestore.plugins.feature_kinds",
    "featurestore.plugins.cnn_runtimes",
    "featurestore.plugins.index_backends",
)
"""Modules registering the built-ins, loaded by name (they import what they register only when called)."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: what ``fs plugins`` shows.

    ``error`` is set (and ``hooks`` empty) for an installed plugin that failed to load;
    ``provides`` names what its registration hooks register (``feature kind colour-moments``).
    """

    name: str
    hooks: tuple[str, ...]
    module: str
    distribution: str | None
    version: str | None
    builtin: bool
    error: str | None = None
    provides: tuple[str, ...] = ()


_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_extra: list[tuple[str, str | None, str | None]] = []  # (plugin name, distribution, version) of entry points
_failed: list[PluginInfo] = []


def plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager: built-ins, then the ``featurestore`` entry points, loaded once.

    A plugin whose import fails is not registered; it is listed by
    :func:`plugins` with its error instead of stopping every command.
    """
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(GROUP)
            pm.add_hookspecs(hookspecs)
            for name in BUILTINS:
                pm.register(importlib.import_module(name), name=name)
            _load_entry_points(pm)
            _manager = pm
        return _manager


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist
        where = (dist.metadata["Name"] if dist is not None else None, dist.version if dist is not None else None)
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure of third-party code: listed, never fatal
            _failed.append(PluginInfo(ep.name, (), ep.value, *where, builtin=False,
                                      error=f"{type(exc).__name__}: {exc}"))
            continue
        _extra.append((ep.name, *where))


def failed() -> list[PluginInfo]:
    """Installed plugins that could not be loaded, with their errors."""
    plugin_manager()
    return list(_failed)


def plugins() -> list[PluginInfo]:
    """Every plugin: built-ins first, then installed ones (including those that failed to load)."""
    pm = plugin_manager()
    found = {name: (dist, version) for name, dist, version in _extra}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        module = getattr(plugin, "__name__", type(plugin).__module__)
        dist, version = found.get(name, (None, None))
        builtin = name in BUILTINS or module.startswith("featurestore.")
        if builtin and dist is None:
            dist, version = "featurestore", _own_version()
        out.append(PluginInfo(name, hooks, module, dist, version, builtin, provides=_provides(pm, plugin)))
    out.sort(key=lambda p: (not p.builtin, p.name))
    return out + list(_failed)


# What each registration hook registers, and the attribute naming it.
_REGISTERS = {"register_feature_kinds": ("feature kind", "kind"), "register_cnn_runtimes": ("CNN runtime", "name"),
              "register_index_backends": ("index backend", "name")}


def _provides(pm: pluggy.PluginManager, plugin: Any) -> tuple[str, ...]:
    """What ``plugin``'s own registration hooks register (calling them imports the code they register)."""
    out: list[str] = []
    callers = {caller.name: caller for caller in pm.get_hookcallers(plugin) or ()}
    for hook, (what, key) in _REGISTERS.items():
        for impl in callers[hook].get_hookimpls() if hook in callers else ():
            if impl.plugin is plugin:
                found: list[Any] = []
                try:
                    impl.function(register=found.append)
                except Exception as exc:  # noqa: BLE001 - listed, so that `fs plugins` shows which one fails
                    out.append(f"{hook} failed ({type(exc).__name__}: {exc})")
                out += [f"{what} {getattr(item, key, '?')}" for item in found]
    return tuple(out)


def _own_version() -> str | None:
    try:
        return importlib.metadata.version("featurestore")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return None


class PluginError(FeatureStoreError):
    """Two plugins register the same name, or a plugin registers something featurestore cannot use."""


def collect(hook: str) -> list[Any]:
    """What the plugins pass to ``register`` when ``hook(register=...)`` is called.

    Plugins are asked in the order they were registered (the built-ins first),
    each keeping its own order, so listings are stable; pluggy would call the
    last registered first.
    """
    found: list[Any] = []
    for impl in getattr(plugin_manager().hook, hook).get_hookimpls():
        try:
            impl.function(register=found.append)
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name} failed in its hook {hook} ({type(exc).__name__}: "
                              f"{exc}); fix or uninstall it") from exc
    return found


def named(hook: str, key: str, what: str) -> dict[str, Any]:
    """What the plugins register through ``hook``, by their ``key`` attribute (built-ins first).

    Raises
    ------
    PluginError
        Two registrations use the same name (a plugin cannot replace a built-in silently).
    """
    out: dict[str, Any] = {}
    for item in collect(hook):
        name = getattr(item, key)
        if name in out:
            raise PluginError(f"two plugins register the {what} {name!r}; uninstall one of the two plugins")
        out[name] = item
    return out


def register(plugin: Any, name: str | None = None) -> str | None:
    """Register a plugin object or module in this process (tests and embedding programs)."""
    return plugin_manager().register(plugin, name=name)


def unregister(plugin: Any) -> None:
    """Remove a plugin registered with :func:`register`."""
    plugin_manager().unregister(plugin)
