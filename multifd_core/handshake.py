"""Which connection is this: the pure classification of a destination's new connections.

PLACEHOLDER of the lead's branch: replaced by the protocol engineer's tested module at merge.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadMagic, DuplicateChannel, MainStreamError, UuidMismatch
from .wire import MULTIFD_INIT_SIZE, MULTIFD_MAGIC_BYTES, decode_init

HEAD_SIZE = 4
QEVM = b"QEVM"


@dataclass(frozen=True)
class MainChannel:
    pass


@dataclass(frozen=True)
class MultiFDChannel:
    id: int
    uuid: bytes


class Handshake:
    def __init__(self, num_channels: int, expected_uuid: bytes | None) -> None:
        self.num_channels = num_channels
        self.expected_uuid = expected_uuid
        self.source_uuid: bytes | None = None
        self.main = False
        self.ids: set[int] = set()

    def bytes_needed(self, head: bytes | bytearray) -> int:
        return MULTIFD_INIT_SIZE if bytes(head[:4]) == MULTIFD_MAGIC_BYTES else HEAD_SIZE

    def classify(self, head: bytes | bytearray) -> MainChannel | MultiFDChannel:
        magic = bytes(head[:4])
        if magic == QEVM:
            if self.main:
                raise MainStreamError("a second main channel (QEVM) connected")
            self.main = True
            return MainChannel()
        if magic == MULTIFD_MAGIC_BYTES:
            init = decode_init(
                bytes(head), num_channels=self.num_channels, expected_uuid=self.expected_uuid
            )
            if self.source_uuid is None:
                self.source_uuid = init.uuid
            elif init.uuid != self.source_uuid:
                raise UuidMismatch(
                    f"channel {init.id} has uuid {init.uuid.hex()}, channel(s) before it "
                    f"{self.source_uuid.hex()}",
                    channel=init.id,
                )
            if init.id in self.ids:
                raise DuplicateChannel(f"two channels announced id {init.id}", channel=init.id)
            self.ids.add(init.id)
            return MultiFDChannel(init.id, init.uuid)
        tls = " (a TLS handshake: the peer uses TLS, this side does not)"
        raise BadMagic(
            f"a connection starts with {magic.hex()}: neither a main channel "
            f"({QEVM.hex()}) nor a multifd channel ({MULTIFD_MAGIC_BYTES.hex()})"
            + (tls if magic[:2] == b"\x16\x03" else "")
        )
