"""multifd: QEMU-compatible multifd memory migration over parallel channels, in trio.

Importing the package loads none of its modules: each name of ``__all__`` is imported from its
module when first used (PEP 562), so ``import multifd_core`` and ``multifd --help`` stay quick
and leave trio, numpy, ssl and the plugins unloaded until something needs them. Type checkers
and IDEs read the imports under ``TYPE_CHECKING`` below, which name every export.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bitmap import PageBitmap
    from .destination import Destination, open_destination, receive
    from .endpoints import Acceptor, Connector
    from .errors import (
        BadChannelId,
        BadFlags,
        BadMagic,
        BadNormalPages,
        BadOffset,
        BadPacketSize,
        BadPagesAlloc,
        BadVersion,
        BlockMismatch,
        ChannelClosed,
        ChannelError,
        ChannelStalled,
        CompressionMismatch,
        ConfigError,
        DecompressionError,
        DestinationFailed,
        DuplicateChannel,
        IncompleteMigration,
        IntegrityError,
        LimitExceeded,
        MainStreamError,
        MethodError,
        MigrationTimeout,
        MultiFDError,
        PluginConflictError,
        PluginError,
        PluginLoadError,
        ProtocolError,
        SnapshotError,
        StorageError,
        SyncError,
        TLSError,
        TruncatedStream,
        UnknownBlock,
        UnknownMethodError,
        UuidMismatch,
    )
    from .hookspecs import MULTIFD_HOOK_API, hookimpl
    from .methods import Buffer, MultiFDMethod, RecvContext, SendContext, int_option, scatter
    from .options import DestinationChanges, DestinationOptions, SourceChanges, SourceOptions
    from .ram import RAMBlock
    from .registry import MethodInfo, MethodRegistry, load_methods
    from .source import Source, migrate, open_source
    from .stats import MigrationStats, MigrationStatus, Progress
    from .tls import TLSAcceptor, client_context, server_context, tls_acceptor, tls_connector
    from .transport import (
        MemoryNetwork,
        SocketAcceptor,
        UnixAcceptor,
        open_tcp_acceptor,
        open_unix_acceptor,
        tcp_connector,
        unix_connector,
    )

__version__ = "0.1.0"

__all__ = [
    "MULTIFD_HOOK_API",
    # the ends
    "Destination",
    "DestinationChanges",
    "DestinationOptions",
    "MigrationStats",
    "MigrationStatus",
    "Source",
    "SourceChanges",
    "SourceOptions",
    "migrate",
    "open_destination",
    "open_source",
    "receive",
    # connecting and accepting
    "Acceptor",
    "Connector",
    "MemoryNetwork",
    "SocketAcceptor",
    "TLSAcceptor",
    "UnixAcceptor",
    "client_context",
    "open_tcp_acceptor",
    "open_unix_acceptor",
    "server_context",
    "tcp_connector",
    "tls_acceptor",
    "tls_connector",
    "unix_connector",
    # memory and methods
    "Buffer",
    "MethodInfo",
    "MethodRegistry",
    "MultiFDMethod",
    "PageBitmap",
    "Progress",
    "RAMBlock",
    "RecvContext",
    "SendContext",
    "hookimpl",
    "int_option",
    "load_methods",
    "scatter",
    # errors: every exception class of multifd_core.errors (tests/test_public_api.py)
    "BadChannelId",
    "BadFlags",
    "BadMagic",
    "BadNormalPages",
    "BadOffset",
    "BadPacketSize",
    "BadPagesAlloc",
    "BadVersion",
    "BlockMismatch",
    "ChannelClosed",
    "ChannelError",
    "ChannelStalled",
    "CompressionMismatch",
    "ConfigError",
    "DecompressionError",
    "DestinationFailed",
    "DuplicateChannel",
    "IncompleteMigration",
    "IntegrityError",
    "LimitExceeded",
    "MainStreamError",
    "MethodError",
    "MigrationTimeout",
    "MultiFDError",
    "PluginConflictError",
    "PluginError",
    "PluginLoadError",
    "ProtocolError",
    "SnapshotError",
    "StorageError",
    "SyncError",
    "TLSError",
    "TruncatedStream",
    "UnknownBlock",
    "UnknownMethodError",
    "UuidMismatch",
]

#: Where each name of ``__all__`` lives: its module (relative), imported on first use.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "bitmap": ("PageBitmap",),
    "destination": ("Destination", "open_destination", "receive"),
    "endpoints": ("Acceptor", "Connector"),
    "errors": (
        "BadChannelId",
        "BadFlags",
        "BadMagic",
        "BadNormalPages",
        "BadOffset",
        "BadPacketSize",
        "BadPagesAlloc",
        "BadVersion",
        "BlockMismatch",
        "ChannelClosed",
        "ChannelError",
        "ChannelStalled",
        "CompressionMismatch",
        "ConfigError",
        "DecompressionError",
        "DestinationFailed",
        "DuplicateChannel",
        "IncompleteMigration",
        "IntegrityError",
        "LimitExceeded",
        "MainStreamError",
        "MethodError",
        "MigrationTimeout",
        "MultiFDError",
        "PluginConflictError",
        "PluginError",
        "PluginLoadError",
        "ProtocolError",
        "SnapshotError",
        "StorageError",
        "SyncError",
        "TLSError",
        "TruncatedStream",
        "UnknownBlock",
        "UnknownMethodError",
        "UuidMismatch",
    ),
    "hookspecs": ("MULTIFD_HOOK_API", "hookimpl"),
    "methods": ("Buffer", "MultiFDMethod", "RecvContext", "SendContext", "int_option", "scatter"),
    "options": ("DestinationChanges", "DestinationOptions", "SourceChanges", "SourceOptions"),
    "ram": ("RAMBlock",),
    "registry": ("MethodInfo", "MethodRegistry", "load_methods"),
    "source": ("Source", "migrate", "open_source"),
    "stats": ("MigrationStats", "MigrationStatus", "Progress"),
    "tls": ("TLSAcceptor", "client_context", "server_context", "tls_acceptor", "tls_connector"),
    "transport": (
        "MemoryNetwork",
        "SocketAcceptor",
        "UnixAcceptor",
        "open_tcp_acceptor",
        "open_unix_acceptor",
        "tcp_connector",
        "unix_connector",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


if not TYPE_CHECKING:  # mypy sees the imports above, not an ``Any`` for every other name

    def __getattr__(name: str) -> Any:
        """An exported name, imported from its module now; else a submodule (``.tls``)."""
        module = _MODULE_OF.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
        elif name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = value  # the next lookup finds it without this function
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
