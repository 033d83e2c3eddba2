"""The hooks a compression plugin implements (pluggy, project name ``multifd``).

A plugin is a module or object with ``@hookimpl``-marked functions, published in the
``multifd`` entry-point group::

    [project.entry-points.multifd]
    zstd = "multifd_zstd"
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .methods import MultiFDMethod

PROJECT_NAME = "multifd"
ENTRY_POINT_GROUP = "multifd"

#: The hook API this multifd-core implements: the hooks below, the method and context classes a
#: plugin subclasses and their documented contracts. Raised only by an incompatible change (a
#: hook removed or given other arguments, a contract a plugin relies on changed); additions keep
#: it. A plugin module declares the version it was written for as a module attribute,
#: ``MULTIFD_HOOK_API = 1``; the registry refuses one declaring a version outside
#: ``OLDEST_HOOK_API..MULTIFD_HOOK_API`` (docs/writing-a-plugin.md, "Versions").
MULTIFD_HOOK_API = 1
#: The oldest hook API version this multifd-core still loads plugins of.
OLDEST_HOOK_API = 1
#: The module attribute a plugin declares its hook API version in (absent: version 1).
HOOK_API_ATTRIBUTE = "MULTIFD_HOOK_API"

#: The compression values claimed so far, by the bundled methods and the plugins known to this
#: project: value -> (method name, who claims it). ``multifd new-plugin`` refuses them, as it
#: refuses the values of installed plugins; the table in docs/writing-a-plugin.md shows them.
CLAIMED_VALUES: dict[int, tuple[str, str]] = {
    0: ("none", "multifd-core (built-in); QEMU's multifd-compression=none"),
    1: ("zlib", "multifd-zlib; QEMU's multifd-compression=zlib"),
    2: ("zstd", "multifd-zstd; QEMU's multifd-compression=zstd"),
    3: ("lz4", "multifd-lz4 (multifd-core's own format, not QEMU's)"),
    4: ("bz2", "multifd-bz2-example (the guide's example)"),
}

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    """Return the compression method classes this plugin provides.

    Each class subclasses :class:`multifd_core.MultiFDMethod` and sets ``name`` and ``value``
    (the 3-bit compression field of the packet flags, 0..7).
    """
    raise NotImplementedError
