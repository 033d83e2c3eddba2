"""The registry of installed compression methods, found as pluggy plugins.

Discovery is pluggy's, as pytest and tox use it: the built-in ``nocomp`` plugin first, then every
entry point of the ``multifd`` group, each loaded on its own so that a broken plugin does not stop
the others, then plugin objects the program registers itself. Two plugins claiming one value or
name are a conflict naming both. A plugin declaring a hook API this core does not implement, or
registering no hook at all, is a problem naming it. ``load_methods`` discovers once per process
for each set of arguments and hands out the same registry afterwards.

pluggy, ``importlib.metadata`` and the plugins are imported by the first discovery, not with this
module: the options name :class:`MethodRegistry`, and ``multifd --help`` reads the options.
"""

from __future__ import annotations

import logging
import re
import threading
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .errors import PluginConflictError, PluginError, PluginLoadError, UnknownMethodError
from .methods import MultiFDMethod

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodInfo:
    """An installed method: where it came from and how to make it."""

    value: int
    name: str
    cls: type[MultiFDMethod]
    plugin: str
    distribution: str

    def create(self, **options: Any) -> MultiFDMethod:
        return self.cls(**options)


@dataclass
class MethodRegistry:
    """The methods found, by value, plus the problems met while loading plugins."""

    methods: dict[int, MethodInfo] = field(default_factory=dict)
    problems: list[PluginError] = field(default_factory=list)
    conflicts: dict[int, PluginConflictError] = field(default_factory=dict)

    def __iter__(self) -> Iterator[MethodInfo]:
        return iter(sorted(self.methods.values(), key=lambda m: m.value))

    def get(self, key: str | int) -> MethodInfo:
        """Find a method by name, alias or value; explains why when it cannot be used."""
        if isinstance(key, int):
            value = key
        else:
            value = -1
            for info in self.methods.values():
                if key == info.name or key in info.cls.aliases:
                    value = info.value
            for val, conflict in self.conflicts.items():
                claimants = conflict.claimants  # type: ignore[attr-defined]
                if any(key == c.name or key in c.cls.aliases for c in claimants):
                    value = val
        if value in self.conflicts:
            raise self.conflicts[value]
        if value in self.methods:
            return self.methods[value]
        about = self.problems_about(key)
        known = ", ".join(m.name for m in self) or "none"
        message = f"no compression method {key!r} installed (installed: {known})"
        if about:
            message += "; plugin problems: " + "; ".join(str(p) for p in about)
        others = len(self.problems) - len(about)
        if others:
            message += (
                f"; {others} {'other ' if about else ''}plugin problem{'s' * (others > 1)} "
                "not about it (see `multifd plugins`)"
            )
        raise UnknownMethodError(message)

    def problems_about(self, key: str | int) -> list[PluginError]:
        """The problems that may explain why method ``key`` (a name or a value) is missing: those
        naming it as a method, value, entry point or word of the distribution's name."""
        return [p for p in self.problems if _is_about(p, key)]

    def create(self, key: str | int, **options: Any) -> MultiFDMethod:
        return self.get(key).create(**options)

    def check(self) -> None:
        """Raise the first plugin problem, if any (for strict programs and tests)."""
        if self.problems:
            raise self.problems[0]


def _is_about(problem: PluginError, key: str | int) -> bool:
    if isinstance(key, int):
        return key in problem.values
    words = set(re.split(r"[-_.]", problem.distribution or "")) - {"multifd"}
    return key in problem.names or key == problem.plugin or key in words


def _dist_name(dist: Any) -> str:
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _api_problem(plugin: object) -> str | None:
    """What is wrong with the hook API version ``plugin`` declares, if anything."""
    hookspecs = _hookspecs()
    declared = getattr(plugin, hookspecs.HOOK_API_ATTRIBUTE, hookspecs.OLDEST_HOOK_API)
    current = hookspecs.MULTIFD_HOOK_API
    if not isinstance(declared, int) or isinstance(declared, bool):
        return f"declares {hookspecs.HOOK_API_ATTRIBUTE} = {declared!r}, not an integer"
    if declared > current:
        return (
            f"was written for multifd hook API {declared}, newer than this multifd-core's "
            f"{current}: upgrade multifd-core"
        )
    if declared < hookspecs.OLDEST_HOOK_API:
        return (
            f"was written for multifd hook API {declared}, which this multifd-core no longer "
            f"loads (it loads {hookspecs.OLDEST_HOOK_API}..{current}): upgrade the plugin"
        )
    return None


def _no_hook_problem(plugin: object) -> str:
    """Why ``plugin`` registered no hook: a forgotten ``@hookimpl`` or no hook function."""
    if callable(getattr(plugin, "multifd_methods", None)):
        return (
            "registers no hook: its multifd_methods is not marked @hookimpl "
            "(from multifd_core import hookimpl)"
        )
    return "registers no hook: it has no @hookimpl multifd_methods function"


def _hookspecs() -> ModuleType:
    """The hook specifications (they import pluggy: only once plugins are looked at)."""
    from . import hookspecs

    return hookspecs


def _names(info: MethodInfo) -> tuple[str, ...]:
    return (info.name, *info.cls.aliases)


class _Loader:
    """One discovery: the plugin manager, the registry it fills, and where each plugin came from."""

    def __init__(self, allow: Iterable[str] | None) -> None:
        import pluggy

        hookspecs = _hookspecs()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = MethodRegistry()
        self.origin: dict[str, str] = {}
        self.allowed = set(allow) if allow is not None else None
        self.claimed_names: dict[str, MethodInfo] = {}

    def problem(
        self,
        message: str,
        plugin: str,
        dist: str,
        names: Iterable[str] = (),
        values: Iterable[int] = (),
    ) -> None:
        self.registry.problems.append(
            PluginLoadError(
                message, plugin=plugin, distribution=dist.split(" ")[0], names=names, values=values
            )
        )

    def register(self, plugin: object, name: str, dist: str, where: str = "") -> None:
        """Register ``plugin`` as ``name`` from ``dist`` (``where``: its entry point, for the
        reports), unless its hook API version is not this core's or it registers no hook."""
        about = f"plugin {name!r} ({dist}{where})"
        bad_api = _api_problem(plugin)
        if bad_api:
            self.problem(f"{about} {bad_api}", name, dist)
            return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.problem(f"{about} is invalid: {exc}", name, dist)
            return
        try:
            self.pm.check_pending()
        except Exception as exc:
            self.pm.unregister(plugin)
            self.problem(f"{about} is invalid: {exc}", name, dist)
            return
        if not self.pm.get_hookcallers(plugin):
            self.pm.unregister(plugin)
            self.problem(f"{about} {_no_hook_problem(plugin)}", name, dist)
            return
        self.origin[name] = dist

    def register_entry_points(self) -> None:
        import importlib.metadata as md

        for ep in md.entry_points(group=_hookspecs().ENTRY_POINT_GROUP):
            dist = _dist_name(ep.dist)
            where = f", entry point {ep.name} = {ep.value!r}"
            try:
                plugin = ep.load()
            except Exception as exc:
                self.problem(
                    f"plugin {ep.name!r} ({dist}) failed to import {ep.value!r}: "
                    f"{type(exc).__name__}: {exc}",
                    ep.name,
                    dist,
                )
                continue
            # two distributions may publish the same entry-point name: keep both, so that a
            # clash of their methods is reported as a conflict naming both
            name = ep.name if self.pm.get_plugin(ep.name) is None else f"{ep.name}@{dist}"
            self.register(plugin, name, dist, where)

    def register_objects(self, plugins: Iterable[object]) -> None:
        for i, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"plugin-{i}"
            if isinstance(plugin, types.ModuleType):
                name = plugin.__name__
            self.register(plugin, name, f"{name} (registered by the program)")

    def collect(self) -> None:
        """Ask every registered plugin for its methods, in registration order."""
        for impl in self.pm.hook.multifd_methods.get_hookimpls():
            plugin = impl.plugin_name
            dist = self.origin.get(plugin, "unknown distribution")
            try:
                classes: list[Any] = list(cast(Iterable[Any], impl.function()))
            except Exception as exc:
                self.problem(f"plugin {plugin!r} ({dist}) failed: {exc}", plugin, dist)
                continue
            for cls in classes:
                problem = _check_method_class(cls)
                if problem:
                    message = f"plugin {plugin!r} ({dist}): {problem}"
                    self.problem(message, plugin, dist, *_claims(cls))
                    continue
                info = MethodInfo(cls.value, cls.name, cls, plugin, dist)
                if self.allowed is None or not self.allowed.isdisjoint(_names(info)):
                    self.add(info)

    def add(self, info: MethodInfo) -> None:
        """Install ``info``, or record that it conflicts with a method already claimed."""
        reg = self.registry
        other = reg.methods.get(info.value)
        if other is None and info.value in reg.conflicts:
            conflict = reg.conflicts[info.value]
            conflict.claimants.append(info)  # type: ignore[attr-defined]
            conflict.names |= frozenset(_names(info))
            return
        first = other if other is not None else self.claimed_names.get(info.name)
        if first is None:
            reg.methods[info.value] = info
            self.claimed_names[info.name] = info
            return
        what = f"compression value {info.value}" if other is not None else f"name {info.name!r}"
        err = PluginConflictError(
            f"{what} claimed by two plugins: {first.name!r} from {first.distribution} "
            f"and {info.name!r} from {info.distribution}",
            plugin=info.plugin,
            distribution=info.distribution.split(" ")[0],
            names=(*_names(first), *_names(info)),
            values={first.value, info.value},
        )
        err.claimants = [first, info]  # type: ignore[attr-defined]
        reg.problems.append(err)
        reg.conflicts[first.value] = err
        reg.methods.pop(first.value, None)
        if other is None:
            reg.conflicts[info.value] = err


def _claims(cls: object) -> tuple[list[str], list[int]]:
    """The names and value a refused method class claims, as far as they can be read."""
    name, aliases, value = (getattr(cls, a, None) for a in ("name", "aliases", "value"))
    also = aliases if isinstance(aliases, tuple) else ()
    names = [n for n in (name, *also) if isinstance(n, str)]
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else []
    return names, values


_cache: dict[tuple[object, ...], tuple[MethodRegistry, tuple[object, ...]]] = {}
_cache_lock = threading.RLock()


def load_methods(
    *,
    entry_points: bool = True,
    plugins: Iterable[object] = (),
    allow: Iterable[str] | None = None,
    reload: bool = False,
) -> MethodRegistry:
    """Discover the compression methods, once per process for each set of arguments.

    ``nocomp`` is registered first, then each entry point of the ``multifd`` group, then any
    ``plugins`` objects given here (for programs that embed their own method). ``allow`` keeps only
    the named methods. A plugin that fails to import, fails validation, declares another hook API,
    registers no hook, or claims a value or name already taken is recorded in ``problems`` (and
    logged as a warning); the rest load normally.

    The first call with given arguments discovers; later ones return that same registry (treat it
    as read-only), so ``open_source``/``open_destination`` do not search the installed
    distributions again. ``reload=True`` discovers anew (after installing a plugin in a running
    process) and replaces the cached registry; :func:`clear_method_cache` forgets them all.
    """
    plugins = tuple(plugins)
    key = (entry_points, tuple(id(p) for p in plugins), None if allow is None else frozenset(allow))
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and not reload:
            return cached[0]
        from . import nocomp

        loader = _Loader(allow)
        loader.register(nocomp, "nocomp", "multifd-core (built-in)")
        if entry_points:
            loader.register_entry_points()
        loader.register_objects(plugins)
        loader.collect()
        for error in loader.registry.problems:
            log.warning("multifd plugin problem: %s", error)
        # the plugin objects are kept with their registry: their ids in the key stay theirs
        _cache[key] = (loader.registry, plugins)
        return loader.registry


def clear_method_cache() -> None:
    """Forget every registry ``load_methods`` handed out: the next calls discover anew."""
    with _cache_lock:
        _cache.clear()


def _check_method_class(cls: object) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, MultiFDMethod)):
        return f"{cls!r} is not a MultiFDMethod subclass"
    value = getattr(cls, "value", None)
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"method {cls.__name__} has no name"
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 7:
        return f"method {cls.__name__} ({name!r}) has compression value {value!r}, outside 0..7"
    return None


__all__ = ["MethodInfo", "MethodRegistry", "clear_method_cache", "load_methods"]
