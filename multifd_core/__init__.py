"""multifd: QEMU-compatible multifd memory migration over parallel channels, in trio."""

from __future__ import annotations

from .bitmap import PageBitmap
from .destination import Accept, Destination, open_destination, receive
from .errors import *  # noqa: F403
from .errors import MultiFDError
from .hookspecs import MULTIFD_HOOK_API, hookimpl
from .methods import Buffer, MultiFDMethod, RecvContext, SendContext, int_option, scatter
from .options import DestinationOptions, SourceOptions
from .ram import RAMBlock
from .registry import MethodInfo, MethodRegistry, load_methods
from .source import Source, migrate, open_source
from .stats import MigrationStats, Progress
from .tls import TLSAcceptor, client_context, server_context, tls_acceptor, tls_connector
from .transport import (
    Acceptor,
    Connector,
    MemoryNetwork,
    open_tcp_acceptor,
    open_unix_acceptor,
    tcp_connector,
    unix_connector,
)

__version__ = "0.1.0"

__all__ = [
    "MULTIFD_HOOK_API",
    "Accept",
    "Acceptor",
    "Connector",
    "Buffer",
    "Destination",
    "DestinationOptions",
    "MigrationStats",
    "Source",
    "SourceOptions",
    "migrate",
    "open_destination",
    "open_source",
    "receive",
    "scatter",
    "MemoryNetwork",
    "MethodInfo",
    "MethodRegistry",
    "MultiFDError",
    "MultiFDMethod",
    "PageBitmap",
    "Progress",
    "RAMBlock",
    "RecvContext",
    "SendContext",
    "TLSAcceptor",
    "client_context",
    "server_context",
    "tls_acceptor",
    "tls_connector",
    "hookimpl",
    "int_option",
    "load_methods",
    "open_tcp_acceptor",
    "open_unix_acceptor",
    "tcp_connector",
    "unix_connector",
]
