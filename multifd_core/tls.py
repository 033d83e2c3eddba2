"""TLS for every channel: wrap any connector or acceptor in ``trio.SSLStream``.

The source side (``tls_connector``) completes each handshake before handing the stream out, so
a wrong CA or a wrong hostname fails at connect time. The destination side (``tls_acceptor``)
returns streams whose handshake has not run yet: the destination performs it in each
connection's own task (``ChannelIO.handshake``, bounded by ``handshake_timeout``), so a slow or
hostile client never holds up the accept loop.

Every TLS failure surfaces as :class:`~multifd_core.errors.TLSError` naming what was wrong
(certificate verify failed, hostname mismatch, missing client certificate, a peer that does not
speak TLS, ...). Contexts from ``client_context`` / ``server_context`` require TLS 1.2 or newer
(1.3 is negotiated whenever both ends have it) and never compress.

TLS streams take the generic ``send_all`` / ``receive_some`` path of ``ChannelIO``; plain
sockets keep their zero-copy path untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import weakref
from typing import Any, Self, cast

import trio

from .endpoints import Acceptor, Connector
from .errors import ConfigError, TLSError

StrPath = str | os.PathLike[str]
TLSStream = trio.SSLStream[trio.abc.Stream]

#: Seconds a client waits for the server's side of the handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds spent at most on telling the peer why its handshake failed (the TLS alert).
ALERT_TIMEOUT = 1.0
#: Seconds spent at most on a graceful close (close_notify) of one stream.
CLOSE_TIMEOUT = 1.0

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "TLSAcceptor",
    "TLSStream",
    "client_context",
    "server_context",
    "tls_acceptor",
    "tls_connector",
    "tls_handshake",
]


# --- contexts -------------------------------------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_file: StrPath, key_file: StrPath | None) -> None:
    what = f"certificate {os.fspath(cert_file)!r}" + (
        f" with key {os.fspath(key_file)!r}" if key_file is not None else ""
    )
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot load the TLS {what}: no such file {exc.filename!r}") from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"TLS {what}: the key does not match the certificate") from exc
        raise ConfigError(f"cannot load the TLS {what}: {_ssl_text(exc)}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot load the TLS {what}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: StrPath, role: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"cannot load the TLS {role} {os.fspath(ca_file)!r}: no such file"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load the TLS {role} {os.fspath(ca_file)!r}: {_ssl_text(exc)}"
        ) from exc


def client_context(
    *,
    ca_file: StrPath | None = None,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
) -> ssl.SSLContext:
    """The source's context: verifies the server's certificate and hostname.

    ``ca_file`` (PEM) is the CA to trust; without it the system's trust store is used.
    ``cert_file`` and ``key_file`` (PEM) are this side's client certificate, for servers that
    require one (mutual TLS).
    """
    if key_file is not None and cert_file is None:
        raise ConfigError("a TLS key needs its certificate (cert_file)")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # verify + check_hostname on
    if ca_file is not None:
        _load_ca(ctx, ca_file, "CA file")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        _load_chain(ctx, cert_file, key_file)
    return ctx


def server_context(
    *,
    cert_file: StrPath,
    key_file: StrPath | None = None,
    client_ca_file: StrPath | None = None,
) -> ssl.SSLContext:
    """The destination's context: presents ``cert_file`` / ``key_file`` (PEM).

    With ``client_ca_file``, every client must present a certificate signed by that CA (mutual
    TLS); connections without one, or with one from another CA, are refused.
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, cert_file, key_file)
    if client_ca_file is not None:
        _load_ca(ctx, client_ca_file, "client CA file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# --- errors -------------------------------------------------------------------------------

_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "UNKNOWN_PROTOCOL",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "UNEXPECTED_RECORD",
    "RECORD_TOO_LARGE",
}
_NO_COMMON_VERSION = {
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "VERSION_TOO_LOW",
}


def _ssl_text(exc: BaseException) -> str:
    """``[SSL: X] text (_ssl.c:1006)`` -> ``text``."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = re.sub(r"^\[[A-Z0-9_ ]+: [A-Z0-9_]+\] ", "", text)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", text)


def _root_cause(exc: BaseException) -> BaseException:
    """The ssl or OS error behind trio's BrokenResourceError wrappers (or ``exc`` itself)."""
    seen = exc
    while isinstance(seen, trio.BrokenResourceError | trio.ClosedResourceError):
        if seen.__cause__ is None:
            break
        seen = seen.__cause__
    return seen


def _is_eof(err: BaseException) -> bool:
    return isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError)


def describe(exc: BaseException, *, server_side: bool | None = None) -> str:
    """What went wrong, in words, for an error from a TLS stream (wrapped or not)."""
    err = _root_cause(exc)
    peer = {True: "client", False: "server", None: "peer"}[server_side]
    if isinstance(err, ssl.SSLCertVerificationError):
        return _describe_verify(err, peer)
    if isinstance(err, ssl.SSLError):
        return _describe_ssl(err, peer)
    if isinstance(err, OSError):
        return f"the {peer} closed the connection ({_ssl_text(err)})"
    if isinstance(err, trio.BrokenResourceError | trio.ClosedResourceError):
        return f"the {peer} closed the connection"
    return str(err) or type(err).__name__


def _describe_verify(err: ssl.SSLCertVerificationError, peer: str) -> str:
    msg = (err.verify_message or _ssl_text(err)).rstrip(".")
    if msg.lower().startswith("hostname mismatch"):
        return f"certificate verify failed: {msg}"
    hint = ""
    if err.verify_code in (2, 18, 19, 20, 21):  # no trusted issuer, self-signed
        hint = " (not signed by a CA this side trusts: wrong CA?)"
    return f"certificate verify failed: the {peer}'s certificate: {msg}{hint}"


def _describe_ssl(err: ssl.SSLError, peer: str) -> str:
    reason = err.reason or ""
    if _is_eof(err):
        return f"the {peer} closed the connection in the middle of TLS"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "missing client certificate: the client sent none and this side requires one"
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return "missing client certificate: the server requires one and this side sent none"
    if reason in _NOT_TLS:
        return f"the {peer} does not speak TLS (a plaintext {peer}?): {_ssl_text(err)}"
    if reason in _NO_COMMON_VERSION:
        return f"no TLS version in common with the {peer} (TLS 1.2 or newer required)"
    if "ALERT" in reason:
        return _describe_alert(err, reason, peer)
    return _ssl_text(err)


def _describe_alert(err: ssl.SSLError, reason: str, peer: str) -> str:
    alert = _ssl_text(err).removeprefix("tlsv1 alert ").removeprefix("sslv3 alert ")
    alert = alert.removeprefix("tlsv13 alert ")
    hint = ""
    if reason.endswith(("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        hint = " (it does not accept this side's certificate: wrong CA or hostname?)"
    return f"the {peer} refused the handshake with the alert {alert!r}{hint}"


def stream_failure(exc: BaseException, stream: trio.SSLStream[Any]) -> str | None:
    """For an I/O error on a TLS stream: the TLS reason, or None when it is a plain end of
    connection (reset, closed without close_notify) rather than a TLS failure."""
    err = _root_cause(exc)
    if not isinstance(err, ssl.SSLError) or _is_eof(err):
        return None
    return "TLS: " + describe(err, server_side=stream.server_side)


# --- handshakes and closing ---------------------------------------------------------------


class _BIOTap:
    """Stands in for an SSLContext while ``trio.SSLStream`` builds its SSLObject: passes
    ``wrap_bio`` (the public ``ssl`` API trio builds it with) on to the real context and keeps
    the MemoryBIOs it is given; every other attribute is the real context's."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, **kw: Any) -> Any:
        self.bios = incoming, outgoing
        return self.context.wrap_bio(incoming, outgoing, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.context, name)


_BIOs = weakref.WeakKeyDictionary[trio.SSLStream[Any], ssl.MemoryBIO]
#: The outgoing buffer of each TLS stream this module made (see ``_ssl_stream``).
_OUTGOING: _BIOs = weakref.WeakKeyDictionary()
#: The incoming buffer of each stream whose handshake waits for the peer's first bytes.
_FIRST_BYTES: _BIOs = weakref.WeakKeyDictionary()


def _ssl_stream(
    raw: trio.abc.Stream, context: ssl.SSLContext, *, first_bytes: bool = False, **kw: Any
) -> TLSStream:
    """``trio.SSLStream(raw, context, **kw)``, remembering its outgoing buffer: when a handshake
    fails, trio raises before sending the alert OpenSSL wrote there. ``first_bytes``: see
    ``TLSAcceptor``."""
    tap = _BIOTap(context)
    stream = trio.SSLStream(raw, cast(ssl.SSLContext, tap), **kw)
    if tap.bios is not None:
        _OUTGOING[stream] = tap.bios[1]
        if first_bytes:
            _FIRST_BYTES[stream] = tap.bios[0]
    return stream


async def _await_first_bytes(stream: TLSStream, incoming: ssl.MemoryBIO) -> None:
    """Wait until the client has sent more than its handshake: the next bytes from the
    transport go into the incoming buffer, where the stream's next read finds them."""
    if incoming.pending or stream.pending():
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        data = await stream.transport_stream.receive_some()
        if data:
            incoming.write(data)
            return
    raise TLSError(
        "TLS handshake failed: the client closed the connection right after the handshake, "
        "before its first message: it refused this side's certificate? (wrong CA or host name; "
        "QEMU gives the reason in its query-migrate error-desc)"
    )


async def _send_pending_alert(stream: trio.SSLStream[Any]) -> None:
    """Best effort: send the alert OpenSSL produced for a failed handshake, so that the peer
    learns why (trio raises before sending it). Only for streams made here (``_ssl_stream``)."""
    outgoing = _OUTGOING.get(stream)
    if outgoing is None:
        return
    data = outgoing.read()
    if not data:
        return
    with (
        trio.move_on_after(ALERT_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.transport_stream.send_all(data)


def handshake_done(stream: trio.SSLStream[Any]) -> bool:
    try:
        stream.version()
    except trio.NeedHandshakeError:
        return False
    return True


async def tls_handshake(stream: trio.SSLStream[Any], *, channel: int | None = None) -> None:
    """Run the handshake now; a failure is a ``TLSError`` saying why (and the stream is
    broken: close it)."""
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await _send_pending_alert(stream)
        reason = describe(exc, server_side=stream.server_side)
        raise TLSError(f"TLS handshake failed: {reason}", channel=channel) from exc
    incoming = _FIRST_BYTES.pop(stream, None)
    if incoming is not None:
        await _await_first_bytes(stream, incoming)


async def aclose_tls(stream: trio.SSLStream[Any]) -> None:
    """Close with a close_notify when the handshake is done (bounded by CLOSE_TIMEOUT: a peer
    that does not read cannot hold us); otherwise just drop the connection."""
    if not handshake_done(stream):
        await trio.aclose_forcefully(stream)
        return
    with trio.move_on_after(CLOSE_TIMEOUT):
        # cancelled: SSLStream.aclose closes the transport forcefully itself
        await stream.aclose()


# --- connectors and acceptors -------------------------------------------------------------


def tls_connector(
    connect: Connector,
    context: ssl.SSLContext,
    server_hostname: str | None,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Connector:
    """Wrap ``connect`` (e.g. ``tcp_connector(host, port)``): every stream it opens gets TLS.

    ``server_hostname`` is the name the server's certificate must carry (checked whenever the
    context checks hostnames, as ``client_context`` does). Each call completes the handshake
    before returning, within ``handshake_timeout`` seconds; a failure is a ``TLSError``.
    """
    if context.check_hostname and not server_hostname:
        raise ConfigError("TLS needs the server's hostname to check its certificate")

    async def connect_tls() -> TLSStream:
        raw = await connect()
        try:
            stream = _ssl_stream(raw, context, server_hostname=server_hostname)
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise
        try:
            with trio.fail_after(handshake_timeout):
                await tls_handshake(stream)
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise TLSError(
                f"TLS handshake failed: no answer from the server within {handshake_timeout} s"
            ) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    return connect_tls


class TLSAcceptor:
    """An :class:`Acceptor` wrapping another: ``await acceptor()`` returns the next connection
    as a TLS stream whose handshake has not run yet (the destination runs it in its own task).

    ``address``, ``port`` and ``aclose`` are those of the wrapped acceptor. Two options for
    clients like QEMU's. ``https_compatible`` (trio's option): a client that closes without a
    close_notify ends its stream as a plain end of file, and this side closes without one too
    (QEMU 7.2 ends every TLS channel so; QEMU's own destination tolerates it and sends none).
    No truncation goes unseen: the migration stream frames everything (packet headers, SYNCs,
    QEMU_VM_EOF). ``first_bytes``: the handshake also waits for the client's first bytes, so
    that a client that checks the certificate after the handshake and then just closes (QEMU)
    fails it with a TLSError saying so, not as a channel closed before its first message.
    """

    def __init__(
        self,
        accept: Acceptor,
        context: ssl.SSLContext,
        *,
        https_compatible: bool = False,
        first_bytes: bool = False,
    ) -> None:
        self.accept = accept
        self.context = context
        self.options = {"https_compatible": https_compatible, "first_bytes": first_bytes}

    async def __call__(self) -> TLSStream:
        stream = await self.accept()
        try:
            return _ssl_stream(stream, self.context, server_side=True, **self.options)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    @property
    def address(self) -> Any:
        return getattr(self.accept, "address", None)

    @property
    def port(self) -> int:
        return int(self.accept.port)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        close = getattr(self.accept, "aclose", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def tls_acceptor(
    accept: Acceptor,
    context: ssl.SSLContext,
    *,
    https_compatible: bool = False,
    first_bytes: bool = False,
) -> TLSAcceptor:
    """Wrap ``accept`` (e.g. ``await open_tcp_acceptor(host, port)``) with TLS (the options:
    see :class:`TLSAcceptor`)."""
    return TLSAcceptor(accept, context, https_compatible=https_compatible, first_bytes=first_bytes)
