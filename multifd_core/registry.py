"""The registry of installed compression methods, found as pluggy plugins.

Discovery is pluggy's, as pytest and tox use it: the built-in ``nocomp`` plugin first, then every
entry point of the ``multifd`` group, each loaded on its own so that a broken plugin does not stop
the others, then plugin objects the program registers itself. Two plugins claiming one value or
name are a conflict naming both.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pluggy

from . import hookspecs, nocomp
from .errors import PluginConflictError, PluginError, PluginLoadError, UnknownMethodError
from .methods import MultiFDMethod

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
        hint = "; ".join(str(p) for p in self.problems)
        known = ", ".join(m.name for m in self) or "none"
        raise UnknownMethodError(
            f"no compression method {key!r} installed (installed: {known})"
            + (f"; plugin problems: {hint}" if hint else "")
        )

    def create(self, key: str | int, **options: Any) -> MultiFDMethod:
        return self.get(key).create(**options)

    def check(self) -> None:
        """Raise the first plugin problem, if any (for strict programs and tests)."""
        if self.problems:
            raise self.problems[0]


def _dist_name(dist: Any) -> str:
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _names(info: MethodInfo) -> tuple[str, ...]:
    return (info.name, *info.cls.aliases)


class _Loader:
    """One discovery: the plugin manager, the registry it fills, and where each plugin came from."""

    def __init__(self, allow: Iterable[str] | None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = MethodRegistry()
        self.origin: dict[str, str] = {}
        self.allowed = set(allow) if allow is not None else None
        self.claimed_names: dict[str, MethodInfo] = {}

    def problem(self, message: str) -> None:
        self.registry.problems.append(PluginLoadError(message))

    def register(self, plugin: object, name: str, dist: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.problem(f"plugin {name!r} ({dist}) is invalid: {exc}")
            return
        try:
            self.pm.check_pending()
        except Exception as exc:
            self.pm.unregister(plugin)
            self.problem(f"plugin {name!r} ({dist}) is invalid: {exc}")
            return
        self.origin[name] = dist

    def register_entry_points(self) -> None:
        for ep in md.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = _dist_name(ep.dist)
            try:
                plugin = ep.load()
            except Exception as exc:
                self.problem(
                    f"plugin {ep.name!r} ({dist}) failed to import {ep.value!r}: "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            # two distributions may publish the same entry-point name: keep both, so that a
            # clash of their methods is reported as a conflict naming both
            name = ep.name if self.pm.get_plugin(ep.name) is None else f"{ep.name}@{dist}"
            self.register(plugin, name, dist)

    def register_objects(self, plugins: Iterable[object]) -> None:
        for i, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"plugin-{i}"
            if isinstance(plugin, types.ModuleType):
                name = plugin.__name__
            self.register(plugin, name, f"{name} (registered by the program)")

    def collect(self) -> None:
        """Ask every registered plugin for its methods, in registration order."""
        for impl in self.pm.hook.multifd_methods.get_hookimpls():
            dist = self.origin.get(impl.plugin_name, "unknown distribution")
            try:
                classes: list[Any] = list(cast(Iterable[Any], impl.function()))
            except Exception as exc:
                self.problem(f"plugin {impl.plugin_name!r} ({dist}) failed: {exc}")
                continue
            for cls in classes:
                problem = _check_method_class(cls)
                if problem:
                    self.problem(f"plugin {impl.plugin_name!r} ({dist}): {problem}")
                    continue
                info = MethodInfo(cls.value, cls.name, cls, impl.plugin_name, dist)
                if self.allowed is None or not self.allowed.isdisjoint(_names(info)):
                    self.add(info)

    def add(self, info: MethodInfo) -> None:
        """Install ``info``, or record that it conflicts with a method already claimed."""
        reg = self.registry
        other = reg.methods.get(info.value)
        if other is None and info.value in reg.conflicts:
            reg.conflicts[info.value].claimants.append(info)  # type: ignore[attr-defined]
            return
        first = other if other is not None else self.claimed_names.get(info.name)
        if first is None:
            reg.methods[info.value] = info
            self.claimed_names[info.name] = info
            return
        what = f"compression value {info.value}" if other is not None else f"name {info.name!r}"
        err = PluginConflictError(
            f"{what} claimed by two plugins: {first.name!r} from {first.distribution} "
            f"and {info.name!r} from {info.distribution}"
        )
        err.names = {first.name, info.name}  # type: ignore[attr-defined]
        err.claimants = [first, info]  # type: ignore[attr-defined]
        reg.problems.append(err)
        reg.conflicts[first.value] = err
        reg.methods.pop(first.value, None)
        if other is None:
            reg.conflicts[info.value] = err


def load_methods(
    *,
    entry_points: bool = True,
    plugins: Iterable[object] = (),
    allow: Iterable[str] | None = None,
) -> MethodRegistry:
    """Discover the compression methods.

    ``nocomp`` is registered first, then each entry point of the ``multifd`` group, then any
    ``plugins`` objects given here (for programs that embed their own method). ``allow`` keeps only
    the named methods. A plugin that fails to import, fails validation, or claims a value or name
    already taken is recorded in ``problems`` (and logged); the rest load normally.
    """
    loader = _Loader(allow)
    loader.register(nocomp, "nocomp", "multifd-core (built-in)")
    if entry_points:
        loader.register_entry_points()
    loader.register_objects(plugins)
    loader.collect()
    for error in loader.registry.problems:
        log.info("multifd plugin problem: %s", error)
    return loader.registry


def _check_method_class(cls: object) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, MultiFDMethod)):
        return f"{cls!r} is not a MultiFDMethod subclass"
    value = getattr(cls, "value", None)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 7:
        return f"method {cls.__name__} has compression value {value!r}, outside 0..7"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"method {cls.__name__} has no name"
    return None


__all__ = ["MethodInfo", "MethodRegistry", "load_methods"]
