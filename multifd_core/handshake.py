"""Sans-I/O classification of a destination's new connections from their first bytes.

Every connection to a destination starts with a magic number: ``QEVM`` for the main channel
(QEMU's savevm stream, its file header), ``11 22 33 44`` for a multifd channel (its 64-byte
MultiFDInit_t). :class:`Handshake` is told each connection's first bytes and says which it is;
it remembers what it accepted, so that the rules across connections hold: one main channel,
channel ids unique, every channel with the same uuid.

A connection is one of this migration's once its first message identified it: the first
``QEVM`` (the main channel), or a valid init packet carrying this migration's uuid (the
``expected_uuid`` when this side was given one, else the uuid of the first channel accepted;
before any channel, without an expected uuid, every valid init packet is taken as this
migration's). Everything else is :class:`Junk`, a connection that is not this migration's (a
port scan, a health check, a client of another protocol or of another migration): the caller
closes it, logs why, and the migration goes on. Junk is:

- a failure before the first message is whole (:func:`unidentified`): end of stream, a reset,
  a failed TLS handshake, silence past the handshake timeout, a truncated init packet;
- neither magic (with a hint when the bytes are a TLS handshake), a second ``QEVM`` after the
  main channel was accepted, an init packet of another version or of another uuid.

Fatal, raised (the migration fails with the reason): an init packet of this migration's uuid
with an id outside ``0..num_channels-1`` (BadChannelId: a source with more channels than this
side, whose pages would be lost) or an id already accepted (DuplicateChannel).

The caller reads :data:`HEAD_SIZE` bytes, asks :meth:`Handshake.bytes_needed` how many the first
message has in all, reads the rest and calls :meth:`Handshake.classify`::

    head = await receive_exactly(HEAD_SIZE)
    if (need := handshake.bytes_needed(head)) > len(head):
        head += await receive_exactly(need - len(head))
    channel = handshake.classify(head)  # MainChannel(), MultiFDChannel(id, uuid) or Junk(...)

A main channel's message is its first :data:`HEAD_SIZE` bytes only: the main stream's parser
reads them again (the caller pushes them back), so nothing of the stream is taken here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import (
    BadMagic,
    BadVersion,
    DuplicateChannel,
    MainStreamError,
    MultiFDError,
    ProtocolError,
    UuidMismatch,
)
from .mainstream.constants import MAGIC_BYTES as QEVM
from .wire import MULTIFD_INIT_SIZE, MULTIFD_MAGIC_BYTES, decode_init

__all__ = ["HEAD_SIZE", "Handshake", "Junk", "MainChannel", "MultiFDChannel", "unidentified"]

#: Bytes to read first from any connection: the magic number.
HEAD_SIZE: Final = 4
_TLS_RECORD: Final = b"\x16\x03"  # a TLS handshake record: content type 22, version 3.x


@dataclass(frozen=True)
class MainChannel:
    """The connection is the main channel: QEMU's savevm stream (QEVM)."""


@dataclass(frozen=True)
class MultiFDChannel:
    """The connection is multifd channel ``id`` of the source with ``uuid``; ``features``: the
    multifd-py extension's bits its init packet announced (wire.MULTIFD_EXT_*; 0 from QEMU)."""

    id: int
    uuid: bytes
    features: int = 0
    #: the pages per packet it announced (wire.MULTIFD_EXT_PACKET_PAGES); 0: QEMU's
    packet_pages: int = 0


@dataclass(frozen=True)
class Junk:
    """The connection is not one of this migration's: close it, say why, go on."""

    error: MultiFDError

    @property
    def reason(self) -> str:
        """One line: the error's type and message (a ChannelIO's error without the channel
        name it would give: this connection never was a channel)."""
        message = getattr(self.error, "message", None) or str(self.error)
        return f"{type(self.error).__name__}: {message}"


def unidentified(error: MultiFDError) -> Junk:
    """A connection that failed before its first message was whole (its end of stream, a
    reset, a failed TLS handshake, silence past the handshake timeout, a truncated init packet)
    never identified itself as one of this migration's: it is junk, whatever the failure."""
    return Junk(error)


#: decode_init's refusals that say the packet is not this migration's: junk, not fatal.
_NOT_OURS = (BadMagic, BadVersion, UuidMismatch)


class Handshake:
    """The destination's view of the connections so far: which were accepted as what.

    ``num_channels`` is how many multifd channels this side has (ids 0..num_channels-1);
    ``expected_uuid`` the uuid every channel must carry (None: any, but all the same one).
    """

    def __init__(self, num_channels: int, expected_uuid: bytes | None) -> None:
        self.num_channels = num_channels
        self.expected_uuid = expected_uuid
        #: The uuid of the first multifd channel accepted (the source's), None before.
        self.source_uuid: bytes | None = None
        self._main = False
        self._ids: set[int] = set()

    @property
    def main_accepted(self) -> bool:
        """Whether a main channel was accepted."""
        return self._main

    @property
    def channel_ids(self) -> frozenset[int]:
        """The ids of the multifd channels accepted."""
        return frozenset(self._ids)

    @property
    def complete(self) -> bool:
        """Whether the main channel and every multifd channel were accepted."""
        return self._main and len(self._ids) == self.num_channels

    def bytes_needed(self, head: bytes | bytearray) -> int:
        """How many bytes the connection's first message has, given at least its first
        :data:`HEAD_SIZE` bytes: MULTIFD_INIT_SIZE for a multifd channel, HEAD_SIZE for anything
        else (and while fewer than HEAD_SIZE bytes are known)."""
        if head[:HEAD_SIZE] == MULTIFD_MAGIC_BYTES:
            return MULTIFD_INIT_SIZE
        return HEAD_SIZE

    def classify(self, head: bytes | bytearray) -> MainChannel | MultiFDChannel | Junk:
        """What the connection that sent ``head`` (its first :meth:`bytes_needed` bytes) is.

        Junk (accepting nothing; see the module's doc): ``head`` not that long (ProtocolError),
        neither magic (BadMagic), a second main channel (MainStreamError), an init packet of
        another version (BadVersion) or another uuid (UuidMismatch). Raises, accepting nothing,
        for a channel of this migration's uuid that breaks the rules: BadChannelId for an id
        beyond this side's channels, DuplicateChannel for an id already accepted.
        """
        need = self.bytes_needed(head)
        if len(head) != need:
            return Junk(
                ProtocolError(f"a connection's first message is {len(head)} bytes, expected {need}")
            )
        if head == QEVM:
            return self._main_channel()
        if need == MULTIFD_INIT_SIZE:
            return self._multifd_channel(head)
        tls = " (a TLS handshake: the peer uses TLS, this side does not)"
        return Junk(
            BadMagic(
                f"a connection starts with {bytes(head).hex()}: neither a main channel "
                f"({QEVM.hex()}) nor a multifd channel ({MULTIFD_MAGIC_BYTES.hex()})"
                + (tls if head[:2] == _TLS_RECORD else "")
            )
        )

    def _main_channel(self) -> MainChannel | Junk:
        if self._main:
            return Junk(MainStreamError("a second main channel (QEVM) connected"))
        self._main = True
        return MainChannel()

    def _multifd_channel(self, head: bytes | bytearray) -> MultiFDChannel | Junk:
        ours = self.expected_uuid if self.expected_uuid is not None else self.source_uuid
        try:  # the uuid is checked before the id: another migration's channel is junk
            init = decode_init(bytes(head), num_channels=self.num_channels, expected_uuid=ours)
        except _NOT_OURS as exc:
            return Junk(exc)
        # BadChannelId (raised by decode_init): this migration's uuid, an id beyond ours
        if init.id in self._ids:
            raise DuplicateChannel(f"two channels announced id {init.id}", channel=init.id)
        if self.source_uuid is None:
            self.source_uuid = init.uuid
        self._ids.add(init.id)
        return MultiFDChannel(init.id, init.uuid, init.features, init.packet_pages)
