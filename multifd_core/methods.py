"""Compression methods: the base classes plugins implement, and the registry that finds them.

QEMU's ``MultiFDMethods`` table (send_setup/send_prepare/send_cleanup, recv_setup/recv_pages/
recv_cleanup) becomes a method class per 3-bit compression value, creating one send context and
one receive context per channel. Discovery is pluggy's: the built-in ``nocomp`` plugin first, then
every entry point of the ``multifd`` group, each loaded on its own so that a broken plugin does
not stop the others.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import types
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import pluggy

from . import hookspecs
from .errors import (
    ConfigError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    UnknownMethodError,
)

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class SendContext:
    """Per-channel send state (QEMU: MultiFDSendParams.data). May run in a worker thread."""

    def send_prepare(self, pages: Sequence[memoryview]) -> Sequence[Buffer]:
        """Return the payload of one packet holding ``pages`` (the parts are sent in order)."""
        raise NotImplementedError

    def send_cleanup(self) -> None:
        """Release resources; called once when the channel ends, whatever the reason."""


class RecvContext:
    """Per-channel receive state (QEMU: MultiFDRecvParams.data). May run in a worker thread."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        """Decode ``payload`` into ``pages``, filling exactly their bytes.

        Must never produce more than ``sum(len(p) for p in pages)`` bytes, and must raise
        :class:`multifd_core.DecompressionError` when the payload is corrupt, truncated, too long
        or decodes to any other size.
        """
        raise NotImplementedError

    def recv_cleanup(self) -> None:
        """Release resources; called once when the channel ends, whatever the reason."""


class MultiFDMethod(ABC):
    """A compression method. Subclass it, set ``name`` and ``value``, and publish it from a
    ``multifd_methods`` hook implementation.

    Options (``level=3`` and the like) arrive as keyword strings from the API or CLI; a method
    converts and validates them in ``__init__`` and raises ConfigError when they are bad.
    """

    #: The name users pick it by (QEMU's multifd-compression values: none, zlib, zstd).
    name: ClassVar[str]
    #: The 3-bit compression value in the packet flags (flags = value << 1).
    value: ClassVar[int]
    #: Other names accepted for it.
    aliases: ClassVar[tuple[str, ...]] = ()
    #: True when the payload is the pages themselves (the engine then moves it zero-copy).
    raw_payload: ClassVar[bool] = False
    #: True to run send_prepare / recv_pages in a worker thread (C code releasing the GIL).
    threaded: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"method {self.name!r} takes no options, got {sorted(options)}")
        self.options: dict[str, Any] = {}

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        """The (min, max) next_packet_size a receiver accepts for ``raw_len`` bytes of pages."""
        if self.raw_payload:
            return raw_len, raw_len
        return 1, raw_len + raw_len // 8 + 4096

    @abstractmethod
    def send_setup(self, channel: int) -> SendContext:
        """Create the send state of channel ``channel``."""

    @abstractmethod
    def recv_setup(self, channel: int) -> RecvContext:
        """Create the receive state of channel ``channel``."""

    @property
    def flags(self) -> int:
        return self.value << 1


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

    def __iter__(self) -> Any:
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
    from . import nocomp

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = MethodRegistry()
    origin: dict[str, str] = {}

    def register(plugin: object, name: str, dist: str) -> None:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            registry.problems.append(PluginLoadError(f"plugin {name!r} ({dist}) is invalid: {exc}"))
            return
        try:
            pm.check_pending()
        except Exception as exc:
            pm.unregister(plugin)
            registry.problems.append(PluginLoadError(f"plugin {name!r} ({dist}) is invalid: {exc}"))
            return
        origin[name] = dist

    register(nocomp, "nocomp", "multifd-core (built-in)")
    if entry_points:
        for ep in md.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = _dist_name(ep.dist)
            try:
                plugin = ep.load()
            except Exception as exc:
                registry.problems.append(
                    PluginLoadError(
                        f"plugin {ep.name!r} ({dist}) failed to import {ep.value!r}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            # two distributions may publish the same entry-point name: keep both, so that a
            # clash of their methods is reported as a conflict naming both
            name = ep.name if pm.get_plugin(ep.name) is None else f"{ep.name}@{dist}"
            register(plugin, name, dist)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"plugin-{i}"
        if isinstance(plugin, types.ModuleType):
            name = plugin.__name__
        register(plugin, name, f"{name} (registered by the program)")

    allowed = set(allow) if allow is not None else None
    claimed_names: dict[str, MethodInfo] = {}
    for impl in pm.hook.multifd_methods.get_hookimpls():  # registration order
        dist = origin.get(impl.plugin_name, "unknown distribution")
        try:
            classes: list[Any] = list(cast(Iterable[Any], impl.function()))
        except Exception as exc:
            registry.problems.append(
                PluginLoadError(f"plugin {impl.plugin_name!r} ({dist}) failed: {exc}")
            )
            continue
        for cls in classes:
            problem = _check_method_class(cls)
            if problem:
                registry.problems.append(
                    PluginLoadError(f"plugin {impl.plugin_name!r} ({dist}): {problem}")
                )
                continue
            info = MethodInfo(cls.value, cls.name, cls, impl.plugin_name, dist)
            if allowed is not None and allowed.isdisjoint((info.name, *cls.aliases)):
                continue
            other = registry.methods.get(info.value)
            if other is None and info.value in registry.conflicts:
                registry.conflicts[info.value].claimants.append(info)  # type: ignore[attr-defined]
                continue
            other_by_name = claimed_names.get(info.name)
            if other is not None or other_by_name is not None:
                first = other if other is not None else other_by_name
                assert first is not None
                what = (
                    f"compression value {info.value}"
                    if other is not None
                    else f"name {info.name!r}"
                )
                err = PluginConflictError(
                    f"{what} claimed by two plugins: {first.name!r} from {first.distribution} "
                    f"and {info.name!r} from {info.distribution}"
                )
                err.names = {first.name, info.name}  # type: ignore[attr-defined]
                err.claimants = [first, info]  # type: ignore[attr-defined]
                registry.problems.append(err)
                registry.conflicts[first.value] = err
                registry.methods.pop(first.value, None)
                if other is None:
                    registry.conflicts[info.value] = err
                continue
            registry.methods[info.value] = info
            claimed_names[info.name] = info
    for error in registry.problems:
        log.info("multifd plugin problem: %s", error)
    return registry


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
