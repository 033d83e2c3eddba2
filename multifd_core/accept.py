"""A destination's connections: the accept loop and each connection's handshake.

The accept loop takes every connection as it arrives, for the whole migration, and hands each
to a handshake task of its own in the destination's nursery: its TLS handshake and its first
message, within ``handshake_timeout``, classified by ``handshake.py``. A connection that
identified itself (the main channel, a multifd channel of this migration's uuid) goes to the
destination; one that is not this migration's (*junk*: end of stream or silence before its first
message, neither magic, a failed TLS handshake, another migration's uuid, a bad init packet, a
second main channel) is closed and logged at WARNING on ``multifd_core.accept``, one line with
the peer's address and what was wrong, and the migration goes on. Only identified connections
count towards main + N and towards ``connect_timeout``'s error, which names the first refusal.
Accepting goes on after main + N arrived: a connection that identifies itself as one of this
migration's channels with an id beyond this side's (a source with more channels than this side)
or a duplicate id fails the migration with the reason, instead of sitting unread with its pages
lost.

Pending handshakes are bounded: ``max_pending_handshakes``, never fewer than main + N (a source
may open all its connections at once, each with a TLS handshake). A connection arriving with
the bound reached drops the oldest pending handshake (closed, with a warning). The oldest is
the one that has had the most time to speak, and a real channel speaks at once (its init packet
right after its connect or its TLS handshake): a flood of silent connections keeps the source's
channels out only by opening the bound's worth within one handshake's round trips. Refusing the
newest instead (sshd's MaxStartups) would let as many silent connections, renewed every
``handshake_timeout``, lock the source out for good.
"""

from __future__ import annotations

import inspect
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from .endpoints import Acceptor, open_stream
from .errors import ConfigError, LimitExceeded, MigrationTimeout, MultiFDError
from .handshake import HEAD_SIZE, Handshake, Junk, MainChannel, MultiFDChannel, unidentified
from .options import DestinationOptions
from .stats import MigrationStats
from .tls import TLSAcceptor
from .transport import ChannelIO, SocketAcceptor

log = logging.getLogger(__name__)

#: ``run_channel(io, what)``: the destination runs an identified connection to its end.
RunChannel = Callable[[ChannelIO, MainChannel | MultiFDChannel], Awaitable[None]]
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_name(stream: trio.abc.Stream) -> str | None:
    """Who is at the other end of ``stream``, for a log line: ``host:port`` (``[v6]:port``),
    ``pid P uid U`` for a unix socket, None when unknown (memory streams, a peer gone)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            return f"pid {pid} uid {uid}"
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError, AttributeError):
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: What the acceptors of the destinations open now take their connections from (``serving``).
_serving: dict[int, object] = {}


def _served_by(accept: object) -> object:
    """What ``accept`` takes its connections from: a bound method's object, the acceptor a
    TLSAcceptor wraps, a SocketAcceptor's listener (two acceptors on one listener are one)."""
    while True:
        if inspect.ismethod(accept):
            accept = accept.__self__  # MemoryNetwork.accept: the network
        elif isinstance(accept, TLSAcceptor):
            accept = accept.accept
        elif isinstance(accept, SocketAcceptor):
            return accept.listener
        else:
            return accept


@contextmanager
def serving(accept: Acceptor) -> Iterator[None]:
    """One destination at a time on an acceptor: ConfigError at once for a second one while the
    first is open (they would take each other's connections; on a socket, the second's accept
    was trio's BusyResourceError). After the first one, the acceptor may serve another."""
    source = _served_by(accept)
    key = id(source)
    if key in _serving:
        raise ConfigError(
            "this acceptor already serves a destination: one at a time (another destination "
            "at the same time needs its own acceptor)"
        )
    _serving[key] = source  # held: its id stays its own until released
    try:
        yield
    finally:
        del _serving[key]


@dataclass(eq=False)
class _Pending:
    """A connection whose handshake runs; ``dropped`` says why it was cancelled."""

    peer: str | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: MultiFDError | None = None


class Connections:
    """The accept loop and the handshakes of one destination (see the module's doc)."""

    def __init__(
        self,
        accept: Acceptor,
        handshake: Handshake,
        options: DestinationOptions,
        stats: MigrationStats,
        run_channel: RunChannel,
    ) -> None:
        self.accept = accept
        self.handshake = handshake
        self.options = options
        self.stats = stats
        self._run_channel = run_channel
        #: the identified connections (main and multifd channels), in the order identified
        self.ios: list[ChannelIO] = []
        #: the most handshakes pending at once
        self.max_pending = max(options.max_pending_handshakes, handshake.num_channels + 1)
        self._pending: dict[_Pending, None] = {}  # oldest first
        self._idle = trio.Event()  # set while no handshake is pending
        self._idle.set()
        self._arrived = trio.Event()
        self._accepting = trio.CancelScope()
        self._first_refusal = ""

    async def run(self, nursery: trio.Nursery) -> None:
        """Accept (in a task of ``nursery``, until :meth:`stop`); MigrationTimeout if main + N
        have not all identified themselves within ``connect_timeout``."""
        nursery.start_soon(self._accept_loop, nursery, name="accept")
        timeout = self.options.connect_timeout
        with trio.move_on_after(timeout) as scope:
            await self._arrived.wait()
        if scope.cancelled_caught:
            raise MigrationTimeout(self._missing(timeout))

    def _missing(self, timeout: float) -> str:
        n = self.handshake.num_channels
        return (
            f"only {len(self.ios)} of {n + 1} connections (main + {n} channels) arrived "
            f"within {timeout} s" + self.refusals()
        )

    def refusals(self) -> str:
        """For an error that a refusal may explain (connections missing, the main channel
        closed early: a source whose channels were all refused): how many connections were
        refused and the first one's reason (a peer refused on one connection often drops its
        others mid-handshake: their reasons only echo it); "" when none was."""
        refused = self.stats.refused_connections
        if not refused:
            return ""
        return f"; {refused} other connection(s) refused (the first{self._first_refusal})"

    async def stop(self) -> None:
        """Stop accepting, then hear out the handshakes still pending (one may be an extra
        channel, which fails the migration): each ends within its ``handshake_timeout``."""
        self._accepting.cancel()
        while self._pending:
            await self._idle.wait()
        await trio.sleep(0)  # a fatal handshake's error cancels this task before completion

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        with self._accepting:
            while True:
                stream = await open_stream(self.accept, "acceptor")
                if len(self._pending) >= self.max_pending:
                    self._drop(next(iter(self._pending)), self._over_bound())
                pending = _Pending(peer_name(stream))
                self._pending[pending] = None
                if self._idle.is_set():
                    self._idle = trio.Event()
                nursery.start_soon(self._handshake, stream, pending, name="handshake")

    def _over_bound(self) -> LimitExceeded:
        return LimitExceeded(
            f"dropped, the oldest of {len(self._pending)} pending handshakes (the most "
            f"allowed: max_pending_handshakes), when another connection came"
        )

    def _drop(self, pending: _Pending, why: MultiFDError) -> None:
        pending.dropped = why
        pending.scope.cancel()
        self._settle(pending)

    def _settle(self, pending: _Pending) -> None:
        self._pending.pop(pending, None)
        if not self._pending:
            self._idle.set()

    async def _handshake(self, stream: trio.abc.Stream, pending: _Pending) -> None:
        io = ChannelIO(stream, None)
        conn: MainChannel | MultiFDChannel | Junk | None = None
        try:
            with pending.scope:
                conn = await self._identify(io)
            if conn is None:  # dropped: the scope was cancelled by _drop
                assert pending.dropped is not None
                conn = Junk(pending.dropped)
            if isinstance(conn, Junk):
                self._refuse(pending.peer, conn)
                return
            self.ios.append(io)
        finally:
            if conn is None or isinstance(conn, Junk):  # None: a fatal error, or cancelled
                await io.aclose()
            self._settle(pending)  # after the close: no checkpoint before a fatal error's end
        if self.handshake.complete:
            self._arrived.set()
        await self._run_channel(io, conn)

    async def _identify(self, io: ChannelIO) -> MainChannel | MultiFDChannel | Junk:
        """The connection's TLS handshake and first message, within handshake_timeout, and
        what they make it (a main channel's bytes pushed back for its parser)."""
        timeout = self.options.handshake_timeout
        try:
            with trio.fail_after(timeout):
                await io.handshake()  # TLS: here, in this connection's task, bounded
                head = await io.receive_exactly(HEAD_SIZE, "its first message")
                need = self.handshake.bytes_needed(head)
                if need > len(head):
                    head += await io.receive_exactly(need - len(head), "its init packet")
        except trio.TooSlowError:
            return unidentified(MigrationTimeout(f"sent no handshake within {timeout} s"))
        except MultiFDError as exc:
            return unidentified(exc)
        conn = self.handshake.classify(head)
        if isinstance(conn, MainChannel):
            io.unread(head)
        elif isinstance(conn, MultiFDChannel):
            io.channel = conn.id
        return conn

    def _refuse(self, peer: str | None, junk: Junk) -> None:
        where = f" from {peer}" if peer else ""
        if not self._first_refusal:  # the first is the cause; later ones are often its echo
            self._first_refusal = f"{where}: {junk.reason}"
        self.stats.refuse_connection()
        log.warning("refused a connection%s: %s", where, junk.reason)
