"""Source side of the multifd channels: queue pages, cut packets, hand them to idle channels.

QEMU's multifd_queue_page / multifd_send_pages / multifd_send_sync_main / multifd_send_thread.
QEMU's semaphores become trio memory channels: each channel task, when idle, puts its id on the
shared ``idle`` channel and waits on its own job channel; the main side takes the id of the next
idle channel and gives it a job. Owning an idle id is owning that channel until a job is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from xxhash import xxh3_64 as Hash

from . import integrity
from .errors import MethodError
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
log = logging.getLogger(__name__)


def send_setup(method: MultiFDMethod, channel: int) -> SendContext:
    """``method.send_setup(channel)``: what it raises is a MethodError (errors.py)."""
    try:
        return method.send_setup(channel)
    except Exception as exc:
        raise MethodError.raised(method.name, "send_setup", exc, channel=channel) from exc


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
        #: ``method.payload_size(_bound_raw)``, for the last packet size (_checked_size)
        self._bound_raw = -1
        self._bound = (0, 0)

    async def multifd_send_thread(self, idle: trio.MemorySendChannel[int]) -> None:
        try:
            while True:
                await idle.send(self.id)
                job = await self.jobs_recv.receive()
                if job is _QUIT:
                    break
                await self._send_packet(job)
        except BaseException:
            self.cleanup()  # what ended the channel stands
            raise
        self.cleanup(failing=False)

    def cleanup(self, *, failing: bool = True) -> None:
        """send_cleanup, once, whatever ended the channel. When it raises: a MethodError, or
        while the channel (the migration) is ``failing`` already, a warning (the first error
        is the one that tells what went wrong)."""
        if self.cleaned:
            return
        self.cleaned = True
        try:
            self.ctx.send_cleanup()
        except Exception as exc:
            err = MethodError.raised(self.method.name, "send_cleanup", exc, channel=self.id)
            if not failing:
                raise err from exc
            log.warning("%s (the migration had failed or was cancelled)", err)

    def _prepare(
        self, pages: Sequence[memoryview], page_size: int, job: SendJob
    ) -> tuple[Sequence[Buffer], int, Hash | None]:
        """The payload of ``pages``, its size and, with checksums, their hash: in the thread
        that reads the pages anyway (the compressor's, for a threaded method). With checksums,
        payload and hash of a ``live`` block's pages come from one copy of them, so that a page
        changing meanwhile (it is dirty again, and goes again next round) cannot make them
        disagree; a block nothing writes meanwhile (a file) is hashed and sent in place."""
        hashed = None
        if self.checksums:
            assert job.block is not None
            if job.block.live:  # what is hashed must be what is sent: a copy (RAMBlock.live)
                pages = [self._copy(pages, page_size)]
            hashed = integrity.hash_pages(pages)
        if self.method.raw_payload:
            return pages, sum(len(p) for p in pages), hashed
        try:
            payload = self.ctx.send_prepare(pages)
        except Exception as exc:
            raise self._error("send_prepare", exc, job.packet_num) from exc
        raw = len(job.offsets) * page_size
        return payload, self._checked_size(payload, raw, page_size, job.packet_num), hashed

    def _error(self, call: str, exc: Exception, packet_num: int) -> MethodError:
        """``exc`` out of the method's ``call`` for packet ``packet_num``."""
        return MethodError.raised(
            self.method.name, call, exc, channel=self.id, packet_num=packet_num
        )

    def _failed(self, what: str, packet_num: int) -> MethodError:
        return MethodError(what, method=self.method.name, channel=self.id, packet_num=packet_num)

    def _checked_size(self, payload: Sequence[Buffer], raw: int, page_size: int, num: int) -> int:
        """The size of ``payload``, for ``raw`` bytes of pages, which must lie within the
        method's ``payload_size`` bound (a receiver refuses it otherwise, with BadPacketSize):
        a MethodError naming the packet instead of a channel the receiver closed. The bound
        of the last size asked for is kept (full packets: all but a few)."""
        try:
            size = sum(len(p) for p in payload)
        except TypeError as exc:
            what = f"send_prepare returned a {type(payload).__name__}, not a sequence of buffers"
            raise self._failed(what, num) from exc
        if raw != self._bound_raw:
            try:
                self._bound = self.method.payload_size(raw)
            except Exception as exc:
                raise self._error("payload_size", exc, num) from exc
            self._bound_raw = raw
        low, high = self._bound
        if not low <= size <= high:
            bound = f"{low}" if low == high else f"{low}..{high}"
            raise self._failed(
                f"send_prepare made a payload of {size} bytes for {raw // page_size} pages "
                f"({raw} bytes), outside its payload_size bound {bound}: a receiver refuses it",
                num,
            )
        return size

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
        size = 0
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
            ps = job.block.page_size
            if self.method.threaded and not self.method.raw_payload:
                payload, size, hashed = await trio.to_thread.run_sync(
                    self._prepare, pages, ps, job, limiter=self.limiter
                )
            else:  # nocomp copies and hashes here: less than a thread hop (~55 us)
                payload, size, hashed = self._prepare(pages, ps, job)
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
    "send_setup",
]
