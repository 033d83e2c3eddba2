"""The source's side of the return path: the destination's messages, read until its SHUT.

QEMU's source_return_path_thread, for the messages a destination of multifd sends: PONG (it is
reading the stream), SWITCHOVER_ACK, and SHUT, whose status says whether everything landed.
"""

from __future__ import annotations

import trio

from . import returnpath as rp
from .errors import ChannelError, DestinationFailed, ProtocolError
from .transport import ChannelIO


def shut_failed(status: int) -> str:
    """What a SHUT with a failure ``status`` means."""
    return f"the destination refused the migration (return path SHUT, status {status})"


class ReturnPathReader:
    """What the destination said on the return path (``read`` runs as a task, or is called
    again to wait for the rest, bounded, after a send failed)."""

    def __init__(self) -> None:
        #: the status of the destination's SHUT, once it came
        self.shut_status: int | None = None
        self.shut = trio.Event()  # SHUT came, or the return path ended
        self.pongs = 0  # PONGs read: the destination was reading the stream
        self._parser = rp.ReturnPathParser()

    async def read(self, io: ChannelIO) -> None:
        """The destination's messages on the main channel's connection, until its SHUT: one
        with a failure status fails the migration at once (DestinationFailed). A return path
        that ends without a SHUT is judged by the sends and ``complete()``."""
        parser = self._parser
        try:
            while True:
                msg = parser.next_message()
                if msg is None:
                    try:
                        data = await io.receive_back()
                    except ChannelError:
                        return
                    if not data:
                        return
                    parser.feed(data)
                elif msg.type == rp.MIG_RP_MSG_SHUT:
                    self._on_shut(msg.value)
                    return
                elif msg.type == rp.MIG_RP_MSG_PONG:
                    self.pongs += 1
                elif msg.type != rp.MigRpMsg.SWITCHOVER_ACK:
                    raise ProtocolError(f"return path: unexpected {msg.name}")
        finally:
            self.shut.set()

    def _on_shut(self, status: int | None) -> None:
        self.shut_status = status
        if status:
            raise DestinationFailed(shut_failed(status), shut_status=status)


__all__ = ["ReturnPathReader", "shut_failed"]
