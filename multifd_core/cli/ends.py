"""The two ends of a migration as the command line describes them: the engine's keywords
(one function per end), where to connect or listen, and TLS."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from typing import Any

from .. import load_methods
from ..endpoints import Connector
from ..errors import ConfigError
from ..options import DestinationOptions, SourceOptions
from ..tls import TLSAcceptor, client_context, server_context, tls_acceptor, tls_connector
from ..transport import (
    SocketAcceptor,
    open_tcp_acceptor,
    open_unix_acceptor,
    tcp_connector,
    unix_connector,
)
from .parser import parse_options

#: Options only some commands have: argparse's name -> the engine's option, per end.
_SOURCE_ONLY = {
    "uuid": "uuid",
    "zero_page_detection": "zero_page_detection",
    "return_path": "return_path",
    "integrity": "integrity",
    "verify_digests": "verify",
    "packet_size": "packet_size",
}
_DESTINATION_ONLY = {
    "uuid": "uuid",
    "timeout": "connect_timeout",
    "max_size": "max_total_bytes",
    "page_size": "page_size",
    "verify_digests": "verify",
    "max_packet_size": "max_packet_size",
}


def _engine(args: argparse.Namespace, only: dict[str, str]) -> dict[str, Any]:
    """The keywords every command gives the engine, then those of ``only`` it has."""
    method_options = parse_options(args.method_option)
    allowed = args.allow_method
    if allowed is not None and args.compression not in allowed:
        raise ConfigError(
            f"--compression {args.compression} is not among --allow-method {', '.join(allowed)}"
        )
    out = {
        "channels": args.channels,
        "method": args.compression,
        "method_options": method_options,
        "registry": load_methods(allow=allowed),
        "idle_timeout": args.idle_timeout,
        "deadline": args.deadline,
    }
    out.update({key: getattr(args, name) for name, key in only.items() if name in args})
    return out


def source_options(args: argparse.Namespace) -> SourceOptions:
    """The options of open_source (demo, send) and qemu_restore."""
    return SourceOptions.build(**_engine(args, _SOURCE_ONLY))


def destination_options(
    args: argparse.Namespace, base: DestinationOptions | None = None
) -> DestinationOptions:
    """The options of open_destination (demo, recv) and qemu_save, from ``base`` (the command's
    preset: options.RECV_DEFAULTS, options.QEMU_SAVE_DEFAULTS) changed by the arguments."""
    return DestinationOptions.build(base, **_engine(args, _DESTINATION_ONLY))


def connector(address: tuple[str, Any]) -> Connector:
    kind, where = address
    return unix_connector(where) if kind == "unix" else tcp_connector(*where)


async def acceptor(address: tuple[str, Any]) -> SocketAcceptor:
    kind, where = address
    if kind == "unix":
        return await open_unix_acceptor(where)
    return await open_tcp_acceptor(*where)


def write_ready_file(args: argparse.Namespace, accept: SocketAcceptor | TLSAcceptor) -> None:
    """``--ready-file``: the address listened on, for whoever waits to connect (tests)."""
    if args.ready_file:
        Path(args.ready_file).write_text(str(accept.address))


def with_tls(args: argparse.Namespace, connect: Connector) -> Connector:
    """send, qemu-restore: ``connect`` wrapped in TLS when any --tls option is given."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_hostname):
        return connect
    if args.tls_cert and not args.tls_key:
        raise ConfigError("--tls-cert needs --tls-key (the client certificate's private key)")
    if args.tls_key and not args.tls_cert:
        raise ConfigError("--tls-key needs --tls-cert (the client certificate)")
    kind, where = args.connect
    hostname = args.tls_hostname or (where[0] if kind == "tcp" else None)
    if not hostname:
        raise ConfigError("TLS over unix: needs --tls-hostname (the name in the server's cert)")
    ctx = client_context(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    return tls_connector(connect, ctx, hostname)


def tls_server_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """recv, qemu-save: the server's TLS context when any --tls option is given."""
    if not (args.tls or args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ConfigError(
            "TLS on the receiving end needs --tls-cert and --tls-key "
            "(this server's certificate and private key)"
        )
    return server_context(
        cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca
    )


async def tls_listener(
    args: argparse.Namespace, *, peer_is_qemu: bool = False
) -> SocketAcceptor | TLSAcceptor:
    """recv, qemu-save: listen on --listen, with TLS when any --tls option is given (the
    options are checked and the certificates loaded before the port is bound).
    ``peer_is_qemu``: QEMU closes its TLS channels without a close_notify, and closes them
    without a word when it refuses this side's certificate (``TLSAcceptor``'s options)."""
    tls = tls_server_context(args)
    accept = await acceptor(args.listen)
    if tls is None:
        return accept
    return tls_acceptor(accept, tls, https_compatible=peer_is_qemu, first_bytes=peer_is_qemu)
