"""Moving bytes: connecting and accepting channels, and fast reads and writes on them.

A *connector* opens a new ``trio.abc.Stream`` per call (main channel first); an *acceptor*
returns the next incoming one (the protocols: ``endpoints.py``). TCP and unix sockets get a
zero-copy path: scatter-gather ``sendmsg`` of header and page memoryviews, and ``recv_into``
straight into the destination's pages. Any other trio stream (memory streams, TLS) works
through ``send_all`` / ``receive_some``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as _stdsocket
import stat
from collections.abc import Sequence
from typing import Any, Self

import trio

from . import tls as _tls
from .endpoints import Connector
from .errors import ChannelClosed, ChannelError, ConfigError, TLSError

Buffer = bytes | bytearray | memoryview

#: How much a generic stream may read ahead into the channel's own buffer.
READ_CHUNK = 256 * 1024
#: Generic streams are written in pieces of this size, so that progress shows.
SEND_CHUNK = 64 * 1024
#: Linux IOV_MAX.
_IOV_MAX = 1024


# --- connecting -----------------------------------------------------------------------------


def tcp_connector(host: str, port: int) -> Connector:
    """Connect each channel with a new TCP connection to ``host:port``."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return connect


def unix_connector(path: str | os.PathLike[str]) -> Connector:
    """Connect each channel with a new unix-socket connection to ``path``."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_unix_socket(os.fspath(path))

    return connect


class SocketAcceptor:
    """An :class:`Acceptor` of one trio listener (``open_tcp_acceptor``, ``open_unix_acceptor``):
    ``await acceptor()`` returns the next stream; ``address``, ``port``, ``aclose``."""

    def __init__(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        self.listener = listener

    async def __call__(self) -> trio.abc.Stream:
        return await self.listener.accept()

    @property
    def address(self) -> Any:
        sock = getattr(self.listener, "socket", None)
        return sock.getsockname() if sock is not None else None

    @property
    def port(self) -> int:
        addr = self.address
        if not isinstance(addr, tuple):
            raise AttributeError("not a TCP listener")
        return int(addr[1])

    async def aclose(self) -> None:
        await self.listener.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_tcp_acceptor(host: str, port: int = 0, *, backlog: int = 64) -> SocketAcceptor:
    """Listen on ``host:port`` (port 0 picks a free one: see ``SocketAcceptor.port``)."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    for extra in listeners[1:]:
        await extra.aclose()
    return SocketAcceptor(listeners[0])


class UnixAcceptor(SocketAcceptor):
    """An acceptor on a unix socket file it bound: closing it removes that file, but only
    while the file at ``path`` is still the socket it created (same st_dev and st_ino)."""

    def __init__(
        self, listener: trio.abc.Listener[trio.abc.Stream], path: str, made: tuple[int, int] | None
    ) -> None:
        super().__init__(listener)
        self.path = path
        self._made = made  # (st_dev, st_ino) of the socket file; None: nothing to remove

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            made, self._made = self._made, None
            if made is not None and _file_id(self.path) == made:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def _file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at ``path`` (not followed), None if it is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _probe(path: str) -> int:
    """The errno of a non-blocking connect to ``path`` (0: something accepted it)."""
    with _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        return probe.connect_ex(path)


def _clear_stale(path: str) -> None:
    """Make way to bind ``path``: remove a stale socket file there (nobody listens on it: a
    connect is refused); ConfigError for anything else found there, which is left as it is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot listen on unix socket {path!r}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"cannot listen on unix socket {path!r}: it exists and is not a socket")
    err = _probe(path)
    if err in (0, errno.EAGAIN, errno.EINPROGRESS):  # EAGAIN: its backlog is full
        raise ConfigError(f"cannot listen on unix socket {path!r}: another process listens on it")
    if err != errno.ECONNREFUSED:
        raise ConfigError(
            f"cannot listen on unix socket {path!r}: cannot tell whether it is in use "
            f"({os.strerror(err)})"
        )
    if _file_id(path) == (st.st_dev, st.st_ino):  # still the stale one
        os.unlink(path)


async def open_unix_acceptor(path: str | os.PathLike[str], *, backlog: int = 64) -> UnixAcceptor:
    """Listen on the unix socket ``path``, replacing a stale socket file left there (by a
    process that died without closing); a path where a process listens, or that is not a
    socket, is refused with ConfigError. Closing the acceptor removes the socket file.
    A path starting with NUL is Linux's abstract namespace: no file to clear or remove."""
    where = os.fspath(path)
    abstract = where.startswith("\0")
    if not abstract:
        _clear_stale(where)
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    try:
        try:
            await sock.bind(where)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"cannot listen on unix socket {where!r}: {reason}") from exc
        made = None if abstract else _file_id(where)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return UnixAcceptor(trio.SocketListener(sock), where, made)


class MemoryNetwork:
    """In-process channels over trio memory streams, for tests and single-process demos.

    ``connect`` creates a stream pair and hands the far end to ``accept``.
    """

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[trio.abc.Stream](256)
        self.opened: list[trio.abc.Stream] = []

    async def connect(self) -> trio.abc.Stream:
        import trio.testing  # imports pytest: only where memory streams are used

        near, far = trio.testing.memory_stream_pair()
        self.opened += [near, far]
        await self._send.send(far)
        return near

    async def accept(self) -> trio.abc.Stream:
        return await self._recv.receive()


# --- moving bytes ---------------------------------------------------------------------------


def _closed_error(exc: BaseException) -> bool:
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        return True
    return isinstance(exc, OSError) and exc.errno in (
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ENOTCONN,
    )


#: ``ChannelIO.waiting``: no operation in progress.
IDLE = 0
#: Waiting for the next message (packet header, main-stream record): may legitimately wait.
BOUNDARY = 1
#: In the middle of a message or a send: the peer owes us progress.
MID = 2


class ChannelIO:
    """Exact reads and gathered writes on one stream.

    ``channel`` is the multifd channel id for error messages (None: the main channel).
    ``activity`` is the trio time bytes last moved and ``waiting`` what the channel is waiting
    for (IDLE, BOUNDARY, MID): a watchdog (``migration.watchdog``) reads them to find stalls.
    """

    def __init__(self, stream: trio.abc.Stream, channel: int | None = None) -> None:
        self.stream = stream
        self.channel = channel
        self.sock: Any = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.tls: trio.SSLStream[Any] | None = (
            stream if isinstance(stream, trio.SSLStream) else None
        )
        self._pending = bytearray()  # bytes read ahead (generic streams) or pushed back
        self.activity = trio.current_time()
        self.waiting = IDLE

    def _error(self, what: str, exc: BaseException | None = None) -> ChannelError:
        if exc is not None and self.tls is not None:
            reason = _tls.stream_failure(exc, self.tls)
            if reason is not None:
                return TLSError(f"{what}: {reason}", channel=self.channel)
        if exc is None or _closed_error(exc):
            return ChannelClosed(what, channel=self.channel)
        return ChannelError(f"{what}: {exc}", channel=self.channel)

    async def handshake(self) -> None:
        """Complete a TLS stream's handshake now (TLSError saying why if it fails); a no-op
        for other streams and for TLS streams already handshaken."""
        if self.tls is not None:
            await _tls.tls_handshake(self.tls, channel=self.channel)
            self.activity = trio.current_time()

    # sending

    async def send_all(self, data: Buffer) -> None:
        await self.send_parts((data,))

    async def send_parts(self, parts: Sequence[Buffer]) -> None:
        """Send ``parts`` back to back; sockets get one ``sendmsg`` per batch, no joining."""
        self.waiting = MID
        try:
            if self.sock is None:
                data = memoryview(parts[0] if len(parts) == 1 else b"".join(parts)).cast("B")
                for pos in range(0, len(data), SEND_CHUNK):  # chunks: progress is visible
                    await self.stream.send_all(data[pos : pos + SEND_CHUNK])
                    self.activity = trio.current_time()
            else:
                await self._sendmsg_all(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._error("send failed, peer gone", exc) from exc
        finally:
            self.waiting = IDLE

    async def _sendmsg_all(self, parts: Sequence[Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        i = 0
        while i < len(views):
            sent = await self.sock.sendmsg(views[i : i + _IOV_MAX])
            self.activity = trio.current_time()
            while sent:
                n = len(views[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
            while i < len(views) and not len(views[i]):
                i += 1

    # receiving

    def unread(self, data: Buffer) -> None:
        """Push bytes back to be read again first."""
        self._pending[:0] = data

    async def receive_some(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Up to ``max_bytes`` bytes; b"" at end of stream."""
        if self._pending:
            data = bytes(self._pending[:max_bytes])
            del self._pending[:max_bytes]
            return data
        self.waiting = BOUNDARY
        try:
            data = await self.receive_back(max_bytes)
        finally:
            self.waiting = IDLE
        self.activity = trio.current_time()
        return data

    async def receive_back(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Up to ``max_bytes`` bytes the peer sends back on a stream this side writes (QEMU's
        return path), concurrently with the sends; b"" at end of stream. Unwatched: neither
        ``waiting`` nor ``activity`` change (they stay the sender's, for the watchdog)."""
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._error("receive failed", exc) from exc

    async def receive_into(
        self, view: memoryview, what: str = "data", *, eof_ok: bool = False
    ) -> bool:
        """Fill ``view`` exactly; ChannelClosed if the stream ends first.

        With ``eof_ok``, a stream that ends before the first byte returns False instead.
        """
        want = len(view)
        pos = 0
        if self._pending:
            n = min(want, len(self._pending))
            view[:n] = self._pending[:n]
            del self._pending[:n]
            pos = n
        self.waiting = MID if pos or not eof_ok else BOUNDARY
        try:
            if self.sock is not None:
                recv_into = self.sock.recv_into
                while pos < want:
                    n = await recv_into(view[pos:])
                    if not n:
                        break
                    pos += n
                    self.activity = trio.current_time()
                    self.waiting = MID
            else:
                while pos < want:
                    data = await self.stream.receive_some(min(READ_CHUNK, max(want - pos, 4096)))
                    if not data:
                        break
                    self.activity = trio.current_time()
                    self.waiting = MID
                    take = min(len(data), want - pos)
                    view[pos : pos + take] = data[:take]
                    if take < len(data):
                        self._pending += data[take:]
                    pos += take
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._error(f"receive failed in {what}", exc) from exc
        finally:
            self.waiting = IDLE
        if pos < want:
            if pos == 0:
                if eof_ok:
                    return False
                raise ChannelClosed(f"closed by peer before {what}", channel=self.channel)
            raise ChannelClosed(
                f"closed by peer in the middle of {what} ({pos} of {want} bytes)",
                channel=self.channel,
            )
        return True

    async def receive_into_views(self, views: Sequence[memoryview], what: str = "data") -> None:
        """Fill every view in order, exactly; sockets scatter with ``recvmsg_into``."""
        if self.sock is None or self._pending or len(views) == 1:
            for view in views:
                await self.receive_into(view, what)
            return
        todo = [v for v in views if len(v)]
        want = sum(len(v) for v in todo)
        got = 0
        i = 0
        recvmsg_into = self.sock.recvmsg_into
        self.waiting = MID
        try:
            while i < len(todo):
                n = (await recvmsg_into(todo[i : i + _IOV_MAX]))[0]
                self.activity = trio.current_time()
                if not n:
                    raise ChannelClosed(
                        f"closed by peer in the middle of {what} ({got} of {want} bytes)",
                        channel=self.channel,
                    )
                got += n
                while n:
                    size = len(todo[i])
                    if n >= size:
                        n -= size
                        i += 1
                    else:
                        todo[i] = todo[i][n:]
                        n = 0
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._error(f"receive failed in {what}", exc) from exc
        finally:
            self.waiting = IDLE

    async def receive_exactly(self, n: int, what: str = "data") -> bytearray:
        buf = bytearray(n)
        await self.receive_into(memoryview(buf), what)
        return buf

    async def at_eof(self) -> bool:
        """True when the peer has closed and nothing is left to read."""
        data = await self.receive_some(1)
        if data:
            self.unread(data)
            return False
        return True

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                if self.tls is not None:  # a bounded close_notify, none before the handshake
                    await _tls.aclose_tls(self.tls)
                    return
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def send_eof(self) -> None:
        """Half-close our sending side when the stream supports it."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            try:
                await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
