"""Sans-I/O codec of QEMU's return path: the messages a destination writes back to its source
on the main channel's connection (the reverse direction of the same socket).

A QEMU source with the ``return-path`` capability writes QEMU_VM_COMMAND
MIG_CMD_OPEN_RETURN_PATH, then MIG_CMD_PING, after the stream's header; the destination answers
each PING with a PONG carrying the same value, and at the end writes SHUT with its final status
(0: everything loaded; QEMU's source then ends ``completed``; anything else: it ends
``failed``). The source's return-path thread ends at SHUT, or fails when the connection ends
without one. A message is a be16 type, a be16 payload length, then the payload (QEMU's
migration.c ``migrate_send_rp_message``; the types: ``enum mig_rp_message_type``).
SWITCHOVER_ACK is sent only when the switchover-ack capability is on (not supported here).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from .errors import MainStreamError

__all__ = [
    "MIG_RP_MSG_NAMES",
    "MIG_RP_MSG_PONG",
    "MIG_RP_MSG_SHUT",
    "MigRpMsg",
    "RP_FAILURE",
    "RP_SUCCESS",
    "ReturnPathMessage",
    "ReturnPathParser",
    "encode",
    "pong",
    "shut",
]


class MigRpMsg(enum.IntEnum):
    """QEMU's enum mig_rp_message_type (migration/migration.h)."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


MIG_RP_MSG_SHUT: Final = MigRpMsg.SHUT
MIG_RP_MSG_PONG: Final = MigRpMsg.PONG
#: Each message type's name, MIG_RP_MSG_SHUT, ..., by value.
MIG_RP_MSG_NAMES: Final = {int(m): f"MIG_RP_MSG_{m.name}" for m in MigRpMsg}
#: SHUT's statuses: QEMU's destination sends 1 when its load failed.
RP_SUCCESS: Final = 0
RP_FAILURE: Final = 1

_HEAD: Final = struct.Struct(">HH")
_BE32: Final = struct.Struct(">I")
#: The payload length of each message with a fixed one (QEMU's rp_cmd_args).
_LENGTHS: Final = {
    MigRpMsg.SHUT: 4,
    MigRpMsg.PONG: 4,
    MigRpMsg.RESUME_ACK: 4,
    MigRpMsg.SWITCHOVER_ACK: 0,
}
#: The longest payload accepted (REQ_PAGES_ID: 8 + 8 + a 255-byte block name with its length).
_MAX_PAYLOAD: Final = 1024


def encode(msg_type: int, payload: bytes = b"") -> bytes:
    """One return-path message: be16 type, be16 length, payload."""
    return _HEAD.pack(msg_type, len(payload)) + payload


def pong(ping_data: bytes) -> bytes:
    """The PONG for a MIG_CMD_PING whose 4 data bytes are ``ping_data`` (the same be32)."""
    return encode(MIG_RP_MSG_PONG, bytes(ping_data))


def shut(status: int) -> bytes:
    """SHUT with the destination's final status (RP_SUCCESS, or non-zero: failed)."""
    return encode(MIG_RP_MSG_SHUT, _BE32.pack(status))


@dataclass(frozen=True, slots=True)
class ReturnPathMessage:
    """One message read from a return path; ``value`` is the be32 of SHUT / PONG, else None."""

    type: int
    payload: bytes

    @property
    def name(self) -> str:
        return MIG_RP_MSG_NAMES.get(self.type, f"message type {self.type}")

    @property
    def value(self) -> int | None:
        return _BE32.unpack(self.payload)[0] if len(self.payload) == 4 else None


class ReturnPathParser:
    """Bytes of a return path in, :class:`ReturnPathMessage` out (what a source reads)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> ReturnPathMessage | None:
        """The next whole message, or None until more bytes come. A malformed one raises
        MainStreamError (as QEMU's source fails its return path)."""
        if len(self._buf) < _HEAD.size:
            return None
        msg_type, length = _HEAD.unpack_from(self._buf)
        if msg_type not in MIG_RP_MSG_NAMES or msg_type == MigRpMsg.INVALID:
            raise MainStreamError(f"return path: unknown message type {msg_type}")
        want = _LENGTHS.get(msg_type)
        if (want is not None and length != want) or length > _MAX_PAYLOAD:
            raise MainStreamError(
                f"return path: {MIG_RP_MSG_NAMES[msg_type]} of {length} bytes"
                + (f", expected {want}" if want is not None else "")
            )
        if len(self._buf) < _HEAD.size + length:
            return None
        payload = bytes(self._buf[_HEAD.size : _HEAD.size + length])
        del self._buf[: _HEAD.size + length]
        return ReturnPathMessage(msg_type, payload)
