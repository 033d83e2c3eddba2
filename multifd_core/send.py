"""Source side of the multifd channels: queue pages, cut packets, hand them to idle channels.

QEMU's multifd_queue_page / multifd_send_pages / multifd_send_sync_main / multifd_send_thread.
QEMU's semaphores become trio memory channels: each channel task, when idle, puts its id on the
shared ``idle`` channel and waits on its own job channel; the main side takes the id of the next
idle channel and gives it a job. Owning an idle id is owning that channel until a job is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from xxhash import xxh3_64 as Hash

from . import integrity
from .methods import Buffer, MultiFDMethod, SendContext
from .ram import RAMBlock
from .stats import MigrationStats
from .transport import ChannelIO
from .wire import MULTIFD_FLAG_SYNC, MultiFDPacket


@dataclass(slots=True)
class SendJob:
    """One packet to write: pages of one block (maybe none), its flags and number; ``zeros``:
    the zero pages it lists after the normal ones (zero-page-detection=multifd)."""

    block: RAMBlock | None
    offsets: list[int]
    flags: int
    packet_num: int
    zeros: list[int] = field(default_factory=list)


_QUIT = None


class MultiFDSendChannel:
    """One source channel (QEMU: MultiFDSendParams) and its task."""

    def __init__(
        self,
        id: int,
        io: ChannelIO,
        method: MultiFDMethod,
        ctx: SendContext,
        header_pages: int,
        stats: MigrationStats,
        limiter: trio.CapacityLimiter,
        zero_pages_field: bool = False,
        checksums: bool = False,
    ) -> None:
        self.id = id
        self.io = io
        self.method = method
        self.ctx = ctx
        self.header_pages = header_pages
        self.stats = stats
        self.cstats = stats.add_channel(id)
        self.limiter = limiter
        self.zero_pages_field = zero_pages_field
        #: seal every packet with its checksum (announced in this channel's init packet)
        self.checksums = checksums
        #: with checksums, each packet's pages are first copied here (one packet's worth, made
        #: at the first packet): what is hashed is then exactly what is sent, even while another
        #: thread writes the block (a vCPU, a writer marking pages dirty for the next round)
        self._snapshot: memoryview | None = None
        self.jobs_send, self.jobs_recv = trio.open_memory_channel[SendJob | None](0)
        self.cleaned = False

    async def multifd_send_thread(self, idle: trio.MemorySendChannel[int]) -> None:
        try:
            while True:
                await idle.send(self.id)
                job = await self.jobs_recv.receive()
                if job is _QUIT:
                    return
                await self._send_packet(job)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """send_cleanup, once, whatever ended the channel."""
        if not self.cleaned:
            self.cleaned = True
            self.ctx.send_cleanup()

    def _prepare(
        self, pages: Sequence[memoryview], page_size: int
    ) -> tuple[Sequence[Buffer], Hash | None]:
        """The payload of ``pages`` and, with checksums, their hash: in the thread that reads
        the pages anyway (the compressor's, for a threaded method). With checksums, payload
        and hash come from one copy of the pages, so that a page changing meanwhile (it is
        dirty again, and goes again next round) cannot make them disagree."""
        hashed = None
        if self.checksums:
            pages = [self._copy(pages, page_size)]
            hashed = integrity.hash_pages(pages)
        payload = pages if self.method.raw_payload else self.ctx.send_prepare(pages)
        return payload, hashed

    def _copy(self, pages: Sequence[memoryview], page_size: int) -> memoryview:
        """``pages`` copied, one after the other, into the channel's snapshot buffer (memcpy);
        valid until the next packet, which this channel sends only after this one."""
        size = sum(len(p) for p in pages)
        if self._snapshot is None or len(self._snapshot) < size:
            self._snapshot = memoryview(bytearray(max(size, self.header_pages * page_size)))
        out, pos = self._snapshot, 0
        for p in pages:
            out[pos : pos + len(p)] = p
            pos += len(p)
        return out[:size]

    async def _send_packet(self, job: SendJob) -> None:
        payload: Sequence[Buffer] = ()
        hashed: Hash | None = None
        npages = len(job.offsets)
        flags = job.flags
        name = ""
        if npages or job.zeros:
            assert job.block is not None
            name = job.block.name
            flags |= self.method.flags
        if npages:
            assert job.block is not None
            pages = job.block.page_runs(job.offsets)
            if self.method.threaded and not self.method.raw_payload:
                payload, hashed = await trio.to_thread.run_sync(
                    self._prepare, pages, job.block.page_size, limiter=self.limiter
                )
            else:  # nocomp copies and hashes here: less than a thread hop (~55 us)
                payload, hashed = self._prepare(pages, job.block.page_size)
        size = sum(len(p) for p in payload)
        header = MultiFDPacket(
            flags=flags,
            pages_alloc=self.header_pages,
            normal_pages=npages,
            next_packet_size=size,
            packet_num=job.packet_num,
            ramblock=name,
            offsets=job.offsets + job.zeros,
            zero_pages=len(job.zeros),
        ).encode(self.header_pages, zero_pages_field=self.zero_pages_field)
        if self.checksums:
            header = integrity.seal(header, hashed)
        await self.io.send_parts([header, *payload])
        self.stats.packet(
            self.cstats,
            normal_pages=npages,
            zero_pages=len(job.zeros),
            header_bytes=len(header),
            payload_bytes=size,
            sync=bool(flags & MULTIFD_FLAG_SYNC),
            checksum=self.checksums,
        )


class MultiFDSendState:
    """The main side of the source channels (QEMU: multifd_send_state plus the queued pages)."""

    def __init__(self, channels: list[MultiFDSendChannel], pages_per_packet: int) -> None:
        self.channels = channels
        self.pages_per_packet = pages_per_packet
        self.idle_send, self.idle_recv = trio.open_memory_channel[int](len(channels))
        self.packet_num = 0
        self.block: RAMBlock | None = None
        self.offsets: list[int] = []
        self.zeros: list[int] = []

    def start(self, nursery: trio.Nursery) -> None:
        for ch in self.channels:
            nursery.start_soon(
                ch.multifd_send_thread, self.idle_send.clone(), name=f"multifdsend_{ch.id}"
            )

    async def set_block(self, block: RAMBlock) -> None:
        """Send what is queued if it belongs to another block, then queue pages of ``block``."""
        if block is not self.block:
            await self.send_pages()
            self.block = block

    async def queue_pages(self, offsets: list[int], *, zero: bool = False) -> None:
        """Queue pages of the current block in order, handing each packet to a channel as soon
        as it is full (QEMU: multifd_queue_page in a loop). ``zero``: pages known to be zero,
        listed in the packets' zero-page list (they share a packet's room with normal pages)."""
        ppp = self.pages_per_packet
        queue = self.zeros if zero else self.offsets
        i = 0
        while i < len(offsets):
            room = ppp - len(self.offsets) - len(self.zeros)
            queue.extend(offsets[i : i + room])
            i += room
            if len(self.offsets) + len(self.zeros) >= ppp:
                await self.send_pages()
                queue = self.zeros if zero else self.offsets

    async def send_pages(self) -> None:
        """Give the queued pages to the next idle channel (QEMU: multifd_send_pages)."""
        if not self.offsets and not self.zeros:
            return
        job = SendJob(self.block, self.offsets, 0, self._next_packet_num(), self.zeros)
        self.offsets = []
        self.zeros = []
        cid = await self.idle_recv.receive()
        await self.channels[cid].jobs_send.send(job)

    def _next_packet_num(self) -> int:
        num = self.packet_num
        self.packet_num += 1
        return num

    async def _take_all_idle(self) -> list[int]:
        return [await self.idle_recv.receive() for _ in self.channels]

    async def send_sync_main(self) -> None:
        """Flush queued pages, then one SYNC packet on every channel, and wait until every
        channel has written its SYNC (QEMU: multifd_send_sync_main)."""
        await self.send_pages()
        for cid in await self._take_all_idle():
            job = SendJob(None, [], MULTIFD_FLAG_SYNC, self._next_packet_num())
            await self.channels[cid].jobs_send.send(job)
        for cid in await self._take_all_idle():
            self.idle_send.send_nowait(cid)

    async def quit(self) -> None:
        """Tell every channel task to finish once idle."""
        for cid in await self._take_all_idle():
            await self.channels[cid].jobs_send.send(_QUIT)


__all__ = [
    "MultiFDSendChannel",
    "MultiFDSendState",
    "SendJob",
]
