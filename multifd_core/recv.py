"""Destination side of the multifd channels: read packets straight into the blocks, and SYNC.

QEMU's multifd_recv_thread / multifd_recv_sync_main. A channel that reads a SYNC packet reports
it to the main side and waits on its own ``sem_sync``; the main side, at each round end of the
main stream, waits for every channel's SYNC and then releases them all. That barrier is what makes
a page of round k+1 land after the same page of round k although channels run independently.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable

import trio

from .errors import ChannelClosed, MethodError, ProtocolError, SyncError
from .integrity import PacketCheck
from .landing import PacketLanding
from .methods import MultiFDMethod, RecvContext
from .ram import RAMBlock
from .stats import MigrationStats
from .transport import ChannelIO
from .wire import PacketRules, decode_packet

log = logging.getLogger(__name__)


def recv_setup(method: MultiFDMethod, channel: int) -> RecvContext:
    """``method.recv_setup(channel)``: what it raises is a MethodError (errors.py)."""
    try:
        return method.recv_setup(channel)
    except Exception as exc:
        raise MethodError.raised(method.name, "recv_setup", exc, channel=channel) from exc


def payload_bounds(method: MultiFDMethod) -> Callable[[int], tuple[int, int]]:
    """``method.payload_size`` for the packet rules; what a plugin's own raises is a
    MethodError (its channel and packet filled in by the channel). The base class's is used
    as it is: it raises nothing, and each packet's header check calls it."""
    payload_size = method.payload_size
    if type(method).payload_size is MultiFDMethod.payload_size:
        return payload_size

    def bounds(raw_len: int) -> tuple[int, int]:
        try:
            return payload_size(raw_len)
        except Exception as exc:
            raise MethodError.raised(method.name, "payload_size", exc) from exc

    return bounds


class Report(enum.Enum):
    SYNC = "sync"
    EOF = "eof"


class MultiFDRecvState:
    """What the destination's channels share with its main side (QEMU: multifd_recv_state)."""

    def __init__(self, num_channels: int, rules: PacketRules, stats: MigrationStats) -> None:
        self.num_channels = num_channels
        self.rules = rules
        self.stats = stats
        self.channels: dict[int, MultiFDRecvChannel] = {}
        self.blocks: dict[str, RAMBlock] = {}
        self.block_sizes: dict[str, int] = {}
        self.reports_send, self.reports_recv = trio.open_memory_channel[tuple[int, Report]](
            math.inf
        )
        self.completed = False
        self.closed_channels: set[int] = set()
        self.syncs = 0  # sync barriers passed (the setup's included)
        #: a recv_cleanup that raised at its channel's end, raised by ``check_cleanups`` once
        #: every page landed (until then another error may be what ended the channels)
        self.cleanup_error: MethodError | None = None

    def cleanup_all(self) -> None:
        """Every page landed and none may come (``completed``): clean every channel's context
        up now, before the migration is confirmed, so that a failing recv_cleanup fails it."""
        for ch in self.channels.values():
            ch.cleanup_at_end()
        self.check_cleanups()

    def check_cleanups(self) -> None:
        """Raise the first recv_cleanup failure of a channel that ended normally."""
        if self.cleanup_error is not None:
            raise self.cleanup_error

    def set_blocks(self, blocks: dict[str, RAMBlock]) -> None:
        self.blocks = blocks
        self.block_sizes = {name: b.size for name, b in blocks.items()}

    async def recv_sync_main(self) -> None:
        """Wait for one SYNC from every channel, then release them all."""
        got: set[int] = set()
        while len(got) < self.num_channels:
            cid, kind = await self.reports_recv.receive()
            if kind is Report.EOF:
                raise ChannelClosed(f"closed before the SYNC of round {self.syncs}", channel=cid)
            if cid in got:  # a channel blocks after each SYNC until released
                raise SyncError(f"two SYNCs in round {self.syncs}", channel=cid)
            got.add(cid)
        for cid in got:
            self.channels[cid].sem_sync.release()
        self.syncs += 1

    async def wait_all_closed(self) -> None:
        """After the end of the migration: wait until every channel has read its end of stream,
        releasing a channel that reports an extra SYNC on the way (harmless, as in QEMU)."""
        while len(self.closed_channels) < self.num_channels:
            cid, kind = await self.reports_recv.receive()
            if kind is Report.SYNC:
                self.channels[cid].sem_sync.release()


class MultiFDRecvChannel:
    """One destination channel (QEMU: MultiFDRecvParams) and its task."""

    def __init__(
        self,
        id: int,
        io: ChannelIO,
        method: MultiFDMethod,
        ctx: RecvContext,
        state: MultiFDRecvState,
        limiter: trio.CapacityLimiter,
        *,
        checksums: bool = False,
        rules: PacketRules | None = None,
    ) -> None:
        self.id = id
        #: its packets' rules: the destination's, or with the pages per packet it announced
        self.rules = state.rules if rules is None else rules
        self.io = io
        self.method = method
        self.ctx = ctx
        self.state = state
        self.sem_sync = trio.Semaphore(0)
        self.cleaned = False
        #: its init packet announced packet checksums: check every packet (integrity.py)
        self.checksums = checksums
        self.cstats = state.stats.add_channel(id)
        rules = self.rules
        self.landing = PacketLanding(
            io, method, ctx, limiter, rules.max_pages * rules.page_size, rules.payload_size
        )

    async def multifd_recv_thread(self) -> None:
        try:
            await self._run()
        except BaseException:
            self._cleanup(failing=True)  # what ended the channel stands
            raise

    def cleanup_at_end(self) -> None:
        """The channel ended normally: recv_cleanup, its failure kept for ``check_cleanups``
        (raised once every page landed, before the migration completes or is confirmed)."""
        try:
            self._cleanup(failing=False)
        except MethodError as err:
            if self.state.cleanup_error is None:
                self.state.cleanup_error = err

    def _cleanup(self, *, failing: bool) -> None:
        """recv_cleanup, once. When it raises: a MethodError, or while the channel (the
        migration) is ``failing`` already, a warning (the first error tells what went wrong)."""
        if self.cleaned:
            return
        self.cleaned = True
        try:
            self.ctx.recv_cleanup()
        except Exception as exc:
            err = MethodError.raised(self.method.name, "recv_cleanup", exc, channel=self.id)
            if not failing:
                raise err from exc
            log.warning("%s (the migration had failed or was cancelled)", err)

    async def _run(self) -> None:
        state = self.state
        rules = self.rules
        header = bytearray(rules.header_size)
        hview = memoryview(header)
        while True:
            if not await self.io.receive_into(hview, "packet header", eof_ok=True):
                self.cleanup_at_end()
                state.closed_channels.add(self.id)
                state.reports_send.send_nowait((self.id, Report.EOF))
                return
            try:
                packet = decode_packet(header, rules, state.block_sizes)
            except ProtocolError as exc:
                raise exc.located(
                    channel=self.id, packet_num=int.from_bytes(header[24:32], "big")
                ) from None
            except MethodError as exc:  # its payload_size (payload_bounds): the cause stays
                exc.located(channel=self.id, packet_num=int.from_bytes(header[24:32], "big"))
                raise
            check = None
            if self.checksums:
                name = packet.ramblock or None
                check = PacketCheck(hview, self.id, packet.packet_num, name)
            if packet.normal_pages or packet.zero_pages:
                if state.completed:
                    raise ProtocolError(
                        "pages after the migration completed",
                        channel=self.id,
                        packet_num=packet.packet_num,
                    )
                await self.landing.land(state.blocks[packet.ramblock], packet, check)
            elif check is not None:
                check(())  # a header alone: ~1 us
            state.stats.packet(
                self.cstats,
                normal_pages=packet.normal_pages,
                zero_pages=packet.zero_pages,
                header_bytes=rules.header_size,
                payload_bytes=packet.next_packet_size,
                sync=packet.sync,
                checksum=self.checksums,
            )
            if packet.sync and not state.completed:
                state.reports_send.send_nowait((self.id, Report.SYNC))
                await self.sem_sync.acquire()
