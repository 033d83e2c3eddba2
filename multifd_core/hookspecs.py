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

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    """Return the compression method classes this plugin provides.

    Each class subclasses :class:`multifd_core.MultiFDMethod` and sets ``name`` and ``value``
    (the 3-bit compression field of the packet flags, 0..7).
    """
    raise NotImplementedError
