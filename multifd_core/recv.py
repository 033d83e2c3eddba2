"""Destination side of the multifd channels: read packets straight into the blocks, and SYNC.

QEMU's multifd_recv_thread / multifd_recv_sync_main. A channel that reads a SYNC packet reports
it to the main side and waits on its own ``sem_sync``; the main side, at each round end of the
main stream, waits for every channel's SYNC and then releases them all. That barrier is what makes
a page of round k+1 land after the same page of round k although channels run independently.
"""

from __future__ import annotations

import enum
import math

import trio

from .errors import ChannelClosed, ProtocolError, SyncError
from .integrity import PacketCheck
from .landing import PacketLanding
from .methods import MultiFDMethod, RecvContext
from .ram import RAMBlock
from .stats import MigrationStats
from .transport import ChannelIO
from .wire import PacketRules, decode_packet


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
    ) -> None:
        self.id = id
        self.io = io
        self.ctx = ctx
        self.state = state
        self.sem_sync = trio.Semaphore(0)
        #: its init packet announced packet checksums: check every packet (integrity.py)
        self.checksums = checksums
        self.cstats = state.stats.add_channel(id)
        rules = state.rules
        self.landing = PacketLanding(io, method, ctx, limiter, rules.max_pages * rules.page_size)

    async def multifd_recv_thread(self) -> None:
        try:
            await self._run()
        finally:
            self.ctx.recv_cleanup()

    async def _run(self) -> None:
        state = self.state
        rules = state.rules
        header = bytearray(rules.header_size)
        hview = memoryview(header)
        while True:
            if not await self.io.receive_into(hview, "packet header", eof_ok=True):
                state.closed_channels.add(self.id)
                state.reports_send.send_nowait((self.id, Report.EOF))
                return
            try:
                packet = decode_packet(header, rules, state.block_sizes)
            except ProtocolError as exc:
                raise exc.located(
                    channel=self.id, packet_num=int.from_bytes(header[24:32], "big")
                ) from None
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
