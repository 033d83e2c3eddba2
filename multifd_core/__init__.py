"""multifd: QEMU-compatible multifd memory migration over parallel channels, in trio."""

from __future__ import annotations

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
from .stats import MigrationStats, MigrationStatus
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
