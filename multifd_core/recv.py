"""Destination side of the multifd channels: read packets straight into the blocks, and SYNC.

QEMU's multifd_recv_thread / multifd_recv_sync_main. A channel that reads a SYNC packet reports
it to the main side and waits on its own ``sem_sync``; the main side, at each round end of the
main stream, waits for every channel's SYNC and then releases them all. That barrier is what makes
a page of round k+1 land after the same page of round k although channels run independently.
"""

from __future__ import annotations

import enum
import math
import time

import trio

from .errors import ChannelClosed, ProtocolError, SyncError
from .methods import MultiFDMethod, RecvContext
from .ram import RAMBlock
from .stats import ChannelStats, MigrationStats
from .transport import ChannelIO
from .wire import MultiFDPacket, PacketRules, decode_packet

#: INLINE_SLOW_WRITES writes in a row slower than INLINE_WRITE_LIMIT (seconds) move a channel's
#: later page writes off the event loop. Into the page cache, a packet's pwrite takes ~0.1-0.3 ms,
#: less than handing it to a worker thread and back (that hop cost ~30 % of a nocomp migration's
#: time, measured); a file system that throttles (dirty-page limits, a slow disk) takes far
#: longer. One slow write alone may be the process being descheduled, so it takes a few.
INLINE_WRITE_LIMIT = 0.005
INLINE_SLOW_WRITES = 3


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

    def set_blocks(self, blocks: dict[str, RAMBlock]) -> None:
        self.blocks = blocks
        self.block_sizes = {name: b.size for name, b in blocks.items()}

    async def recv_sync_main(self) -> None:
        """Wait for one SYNC from every channel, then release them all."""
        got: set[int] = set()
        while len(got) < self.num_channels:
            cid, kind = await self.reports_recv.receive()
            if kind is Report.EOF:
                raise ChannelClosed(
                    f"closed before the SYNC of round {self.stats.rounds}", channel=cid
                )
            if cid in got:  # a channel blocks after each SYNC until released
                raise SyncError(f"two SYNCs in round {self.stats.rounds}", channel=cid)
            got.add(cid)
        for cid in got:
            self.channels[cid].sem_sync.release()
        self.stats.rounds += 1

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
    ) -> None:
        self.id = id
        self.io = io
        self.method = method
        self.ctx = ctx
        self.state = state
        self.limiter = limiter
        self.sem_sync = trio.Semaphore(0)
        self.cstats = ChannelStats(id)
        state.stats.per_channel.append(self.cstats)
        rules = state.rules
        self._payload = bytearray(
            0 if method.raw_payload else method.payload_size(rules.max_pages * rules.page_size)[1]
        )
        self._bounce: bytearray | None = None  # pages bound for a file block (see _targets)
        self.inline_writes = True  # see write_file
        self._slow_writes = 0  # slow inline writes in a row

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
            if packet.normal_pages or packet.zero_pages:
                if state.completed:
                    raise ProtocolError(
                        "pages after the migration completed",
                        channel=self.id,
                        packet_num=packet.packet_num,
                    )
                await self._recv_pages(packet)
            c = self.cstats
            c.packets += 1
            c.normal_pages += packet.normal_pages
            wire = rules.header_size + packet.next_packet_size
            c.wire_bytes += wire
            s = state.stats
            s.packets += 1
            s.normal_pages += packet.normal_pages
            s.zero_pages += packet.zero_pages
            s.multifd_bytes += wire
            s.payload_bytes += packet.next_packet_size
            if packet.sync:
                c.sync_packets += 1
                if not state.completed:
                    state.reports_send.send_nowait((self.id, Report.SYNC))
                    await self.sem_sync.acquire()

    def _targets(self, block: RAMBlock, spans: list[tuple[int, int]]) -> list[memoryview]:
        """Where the packet's pages land first: the block's memory itself, or for a block with a
        file, this channel's bounce buffer (written to the file with pwrite afterwards)."""
        if block.fd is None:
            host = block.host
            return [host[start:end] for start, end in spans]
        if self._bounce is None:
            rules = self.state.rules
            self._bounce = bytearray(rules.max_pages * rules.page_size)
        bounce = memoryview(self._bounce)
        views = []
        pos = 0
        for start, end in spans:
            views.append(bounce[pos : pos + end - start])
            pos += end - start
        return views

    async def write_file(
        self, block: RAMBlock, spans: list[tuple[int, int]], views: list[memoryview]
    ) -> None:
        """Write a packet's pages (in ``views``) into the block's file: right here while the
        page cache takes them quickly, in a worker thread once INLINE_SLOW_WRITES writes in a row
        took longer than INLINE_WRITE_LIMIT (the file system throttles; the event loop must not
        wait on it)."""
        if self.inline_writes:
            t0 = time.perf_counter()
            block.write_spans(spans, views)
            if time.perf_counter() - t0 <= INLINE_WRITE_LIMIT:
                self._slow_writes = 0
            else:
                self._slow_writes += 1
                self.inline_writes = self._slow_writes < INLINE_SLOW_WRITES
        else:
            await trio.to_thread.run_sync(block.write_spans, spans, views, limiter=self.limiter)

    async def _recv_pages(self, packet: MultiFDPacket) -> None:
        block = self.state.blocks[packet.ramblock]
        if packet.normal_pages:
            spans = block.spans(packet.normal_offsets)
            runs = self._targets(block, spans)
            what = f"packet {packet.packet_num} payload"
            to_file = block.fd is not None
            if self.method.raw_payload and to_file:  # the runs lie end to end in the bounce
                assert self._bounce is not None
                size = packet.normal_pages * block.page_size
                await self.io.receive_into(memoryview(self._bounce)[:size], what)
                await self.write_file(block, spans, runs)
            elif self.method.raw_payload:
                await self.io.receive_into_views(runs, what)
            else:
                payload = memoryview(self._payload)[: packet.next_packet_size]
                await self.io.receive_into(payload, what)

                def land() -> None:
                    self.ctx.recv_pages(payload, runs)
                    if to_file:
                        block.write_spans(spans, runs)

                try:
                    if self.method.threaded:
                        await trio.to_thread.run_sync(land, limiter=self.limiter)
                    else:
                        land()
                except ProtocolError as exc:
                    raise exc.located(channel=self.id, packet_num=packet.packet_num) from None
            # Only now that the pages hold their data: noted before the (awaited) receive, a zero
            # record of the main channel landing meanwhile would clear the mark under data still
            # arriving, and later zero records for these pages would then be skipped.
            block.note_written(packet.normal_offsets)
        for off in packet.zero_offsets:
            block.fill_page(off)
