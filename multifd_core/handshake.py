"""Sans-I/O classification of a destination's new connections from their first bytes.

Every connection to a destination starts with a magic number: ``QEVM`` for the main channel
(QEMU's savevm stream, its file header), ``11 22 33 44`` for a multifd channel (its 64-byte
MultiFDInit_t). :class:`Handshake` is told each connection's first bytes and says which it is,
or raises why it is refused; it remembers what it accepted, so that the rules across
connections hold: one main channel, channel ids unique, every channel with the same uuid.

The caller reads :data:`HEAD_SIZE` bytes, asks :meth:`Handshake.bytes_needed` how many the first
message has in all, reads the rest and calls :meth:`Handshake.classify`::

    head = await receive_exactly(HEAD_SIZE)
    if (need := handshake.bytes_needed(head)) > len(head):
        head += await receive_exactly(need - len(head))
    channel = handshake.classify(head)  # MainChannel() or MultiFDChannel(id, uuid)

A main channel's message is its first :data:`HEAD_SIZE` bytes only: the main stream's parser
reads them again (the caller pushes them back), so nothing of the stream is taken here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import BadMagic, DuplicateChannel, MainStreamError, ProtocolError, UuidMismatch
from .mainstream.constants import MAGIC_BYTES as QEVM
from .wire import MULTIFD_INIT_SIZE, MULTIFD_MAGIC_BYTES, decode_init

__all__ = ["HEAD_SIZE", "Handshake", "MainChannel", "MultiFDChannel"]

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

    def bytes_needed(self, head: bytes | bytearray) -> int:
        """How many bytes the connection's first message has, given at least its first
        :data:`HEAD_SIZE` bytes: MULTIFD_INIT_SIZE for a multifd channel, HEAD_SIZE for anything
        else (and while fewer than HEAD_SIZE bytes are known)."""
        if head[:HEAD_SIZE] == MULTIFD_MAGIC_BYTES:
            return MULTIFD_INIT_SIZE
        return HEAD_SIZE

    def classify(self, head: bytes | bytearray) -> MainChannel | MultiFDChannel:
        """What the connection that sent ``head`` (its first :meth:`bytes_needed` bytes) is.

        Raises, accepting nothing: ProtocolError when ``head`` is not that long; BadMagic for
        neither magic; MainStreamError for a second main channel; decode_init's errors for a bad
        init packet (BadVersion, BadChannelId, UuidMismatch with ``expected_uuid``, ...);
        UuidMismatch when a channel's uuid differs from the channels' before it;
        DuplicateChannel for an id already accepted.
        """
        need = self.bytes_needed(head)
        if len(head) != need:
            raise ProtocolError(
                f"a connection's first message is {len(head)} bytes, expected {need}"
            )
        if head == QEVM:
            return self._main_channel()
        if need == MULTIFD_INIT_SIZE:
            return self._multifd_channel(head)
        tls = " (a TLS handshake: the peer uses TLS, this side does not)"
        raise BadMagic(
            f"a connection starts with {bytes(head).hex()}: neither a main channel "
            f"({QEVM.hex()}) nor a multifd channel ({MULTIFD_MAGIC_BYTES.hex()})"
            + (tls if head[:2] == _TLS_RECORD else "")
        )

    def _main_channel(self) -> MainChannel:
        if self._main:
            raise MainStreamError("a second main channel (QEVM) connected")
        self._main = True
        return MainChannel()

    def _multifd_channel(self, head: bytes | bytearray) -> MultiFDChannel:
        init = decode_init(
            bytes(head), num_channels=self.num_channels, expected_uuid=self.expected_uuid
        )
        if self.source_uuid is not None and init.uuid != self.source_uuid:
            raise UuidMismatch(
                f"channel {init.id} has uuid {init.uuid.hex()}, channel(s) before it "
                f"{self.source_uuid.hex()}",
                channel=init.id,
            )
        if self.source_uuid is None:
            self.source_uuid = init.uuid
        if init.id in self._ids:
            raise DuplicateChannel(f"two channels announced id {init.id}", channel=init.id)
        self._ids.add(init.id)
        return MultiFDChannel(init.id, init.uuid, init.features)
