"""The sending end of a migration: connections, the round loop, and the main channel.

``open_source`` is an async context manager for embedding in a trio program; ``migrate`` runs a
whole migration in one call. Everything a migration starts (channel tasks, sockets, worker-thread
jobs) lives inside the context; any failure ends all of it and surfaces as one exception of this
library (``multifd_core.errors``), never as a raw ExceptionGroup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Unpack

import trio

from . import dialect as _dialect
from . import integrity, scan
from . import mainstream as ms
from .bitmap import PageBitmap
from .boundary import library_errors
from .endpoints import Connector, check_endpoint, open_stream
from .errors import (
    ChannelError,
    ChannelStalled,
    ConfigError,
    DestinationFailed,
    MigrationTimeout,
)
from .extension import MULTIFD_EXT_PACKET_CHECKSUM, MULTIFD_EXT_PACKET_PAGES
from .methods import MultiFDMethod
from .options import SourceChanges, SourceOptions
from .ram import RAMBlock
from .rpreader import ReturnPathReader, shut_failed
from .send import MultiFDSendChannel, MultiFDSendState, send_setup
from .stats import MigrationStats, Progress
from .transport import ChannelIO
from .watchdog import deadline_watch, watchdog
from .wire import MultiFDInit, packet_pages, pages_per_packet, uuid_bytes

#: Main-channel bytes buffered before they are written out mid-round.
MAIN_FLUSH_BYTES = 256 * 1024
_NO_SHUT = "the destination ended its return path without a SHUT: it failed"
#: With ``verify``, the SHUT may come this many times the source's own digest time later.
VERIFY_SLACK = 4


class Source:
    """The sending end. Made by :func:`open_source`; not constructed directly."""

    def __init__(
        self, blocks: Sequence[RAMBlock], connect: Connector, options: SourceOptions
    ) -> None:
        if not blocks:
            raise ConfigError("nothing to migrate: no blocks")
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate block names in {names}")
        if len({b.page_size for b in blocks}) != 1:
            raise ConfigError("all blocks of a migration must have the same page size")
        self.blocks = list(blocks)
        self.options = options
        self.dialect = _dialect.resolve(options)
        self.connect = connect
        self.num_channels = options.channels
        self.method: MultiFDMethod = options.resolve_method()
        self.uuid = uuid_bytes(options.uuid)
        self.page_size = self.blocks[0].page_size
        #: pages per packet: QEMU's, or (announced in the init packets) ``packet_size``'s
        self.pages_per_packet = packet_pages(options.packet_size, self.page_size)
        self.stats = MigrationStats("source", options.channels, self.method.name, self.page_size)
        self.writer = ms.MainStreamWriter(
            machine_type=options.machine_type,
            section_id=options.section_id,
            page_size=self.page_size,
        )
        self.limiter = trio.CapacityLimiter(options.threads)
        self.ios: list[ChannelIO] = []
        self.channels: list[MultiFDSendChannel] = []
        self.main: ChannelIO | None = None
        self.state: MultiFDSendState | None = None
        self.completed = False
        self._busy = False
        self.return_path = ReturnPathReader()  # the destination's messages, with return_path
        self._digest_seconds = 0.0  # how long the content digests took (verify)
        #: the watchdog and the deadline, cancelled once the migration completed
        self._watching = trio.CancelScope()

    async def _watch(self) -> None:
        idle, deadline = self.options.idle_timeout, self.options.deadline
        with self._watching:
            async with trio.open_nursery() as nursery:
                if idle is not None:
                    nursery.start_soon(watchdog, self.ios, idle, name="watchdog")
                if deadline is not None:
                    nursery.start_soon(deadline_watch, deadline, "source", name="deadline")

    async def _connect(self, channel: int | None) -> ChannelIO:
        name = "main channel" if channel is None else f"channel {channel}"
        timeout = self.options.connect_timeout
        try:
            with trio.fail_after(timeout):
                stream = await open_stream(self.connect, "connector")
        except trio.TooSlowError:
            raise MigrationTimeout(f"cannot connect the {name} within {timeout} s") from None
        except OSError as exc:
            raise ChannelError(f"cannot connect: {exc}", channel=channel) from exc
        except ChannelError as exc:  # from the connector itself (TLS): say which channel
            exc.channel = channel
            raise
        io = ChannelIO(stream, channel)
        self.ios.append(io)
        return io

    async def _setup(self, nursery: trio.Nursery) -> None:
        self.main = await self._connect(None)
        # the header at once: a source failing in its channels' setup then fails the
        # destination at once (main closed early), not at its connect_timeout
        self.writer.header()
        await self._flush_main()
        if self.options.return_path:
            nursery.start_soon(self.return_path.read, self.main, name="return path")
        chans = self.channels
        checksums = self.options.integrity
        features = MULTIFD_EXT_PACKET_CHECKSUM if checksums else 0
        if self.pages_per_packet != pages_per_packet(self.page_size):
            features |= MULTIFD_EXT_PACKET_PAGES
        init = MultiFDInit(0, self.uuid, features=features, packet_pages=self.pages_per_packet)
        for i in range(self.num_channels):
            io = await self._connect(i)
            await io.send_all(replace(init, id=i).encode())  # at accept
            chans.append(
                MultiFDSendChannel(
                    i,
                    io,
                    self.method,
                    send_setup(self.method, i),
                    self.pages_per_packet,
                    self.stats,
                    self.limiter,
                    zero_pages_field=self.dialect.zero_pages_in_packets,
                    checksums=checksums,
                )
            )
        self.state = MultiFDSendState(chans, self.pages_per_packet)
        self.state.start(nursery)
        self.stats.start(sum(b.size for b in self.blocks))
        w = self.writer
        if self.options.return_path:
            w.open_return_path()
        w.ram_setup([(b.name, b.size) for b in self.blocks])
        await self._flush_main()
        for b in self.blocks:
            b.mark_all_dirty()  # the first round sends every page
        await self._sync()  # the setup's sync: not a round
        w.eos()
        await self._flush_main()

    async def _sync(self) -> None:
        """SYNC packets on every channel, then (per-round dialect) the MULTIFD_FLUSH record
        that makes the destination wait for them; otherwise the EOS that follows does."""
        assert self.state is not None
        await self.state.send_sync_main()
        if not self.dialect.flush_after_each_section:
            self.writer.multifd_flush()

    async def _send_main(self, data: bytes) -> None:
        assert self.main is not None
        if data:
            await self.main.send_all(data)
            self.stats.add_main_bytes(len(data))

    async def _flush_main(self) -> None:
        await self._send_main(self.writer.take())

    def progress(self) -> Progress:
        """Where the migration is: the round in progress, its plan and the pages sent of it
        (packet by packet), the totals across rounds (a snapshot; see :class:`Progress`)."""
        return self.stats.progress()

    def dirty_pages(self) -> int:
        """Pages marked dirty and not yet sent."""
        return sum(b.dirty_count() for b in self.blocks)

    async def send_round(self) -> int:
        """Send every page dirtied since the last round (all pages the first time), then sync.

        Returns the number of pages sent. Call ``complete()`` for the last round.
        """
        return await self._round(last=False)

    async def complete(self) -> MigrationStats:
        """The last round: remaining dirty pages, the end section, EOF; then close the channels.

        With a return path, it returns only once the destination's SHUT said everything landed
        (DestinationFailed when it says otherwise)."""
        await self._round(last=True)
        assert self.state is not None
        await self.state.quit()
        if self.options.return_path:
            await self._await_shut()
        await self.aclose()  # the end of every stream tells the destination we are done
        self._watching.cancel()
        self.completed = True
        self.stats.finish("completed")
        return self.stats

    async def _round(self, *, last: bool) -> int:
        if self.completed:
            raise ConfigError("the migration has already completed")
        if self._busy:
            raise ConfigError("a round is already running")
        self._busy = True
        try:
            return await self._send_dirty(last)
        finally:
            self._busy = False

    # --- the return path --------------------------------------------------------------------

    @property
    def shut_status(self) -> int | None:
        """The status of the destination's SHUT on the return path, once it came."""
        return self.return_path.shut_status

    async def explain(self, exc: ChannelError) -> None:
        """A send failed: when the destination had read the stream (it answered a PING), its
        return path says why (bounded): DestinationFailed from ``exc``, its SHUT's status or
        none. Otherwise (the destination never read a byte, or the link or peer stalled: nothing
        will come) ``exc`` stands; the wait is bounded by the idle timeout too."""
        if not (self.options.return_path and self.return_path.pongs) or self.main is None:
            return
        if isinstance(exc, ChannelStalled):
            return
        idle = self.options.idle_timeout
        bound = (
            self.options.return_path_timeout
            if idle is None
            else min(idle, self.options.return_path_timeout)
        )
        try:
            with trio.move_on_after(bound):
                await self.return_path.read(self.main)
        except DestinationFailed as failed:
            raise failed from exc
        if self.return_path.shut_status is None:
            raise DestinationFailed(_NO_SHUT) from exc

    async def _await_shut(self) -> None:
        # with verify, the destination digests every block before its SHUT: as long as this
        # side took for the same work, give or take (VERIFY_SLACK)
        timeout = self.options.return_path_timeout + VERIFY_SLACK * self._digest_seconds
        with trio.move_on_after(timeout):
            await self.return_path.shut.wait()
        if not self.return_path.shut.is_set():
            raise MigrationTimeout(f"no SHUT from the destination within {timeout} s of the end")
        status = self.return_path.shut_status
        if status is None:
            raise DestinationFailed(_NO_SHUT)
        if status:  # the reader raises it in its own task too; this one must not complete
            raise DestinationFailed(shut_failed(status), shut_status=status)

    @staticmethod
    def _release(nursery: trio.Nursery, block: RAMBlock, pages: tuple[int, int]) -> None:
        """Let ``block`` drop a window of sent pages, in a worker thread: unmapping 64 MiB
        costs ~6 ms (a file mapping), which the event loop would spend instead of sending."""
        ps = block.page_size
        nursery.start_soon(trio.to_thread.run_sync, block.release, pages[0] * ps, pages[1] * ps)

    async def _send_block(self, block: RAMBlock, bitmap: PageBitmap) -> int:
        """Queue the pages of ``block`` dirty in ``bitmap`` in packets, its zero pages as the
        dialect says (zero records on the main channel, the packets' zero-page list, or normal
        pages). Returns the number of pages."""
        state = self.state
        assert state is not None
        await state.set_block(block)  # QEMU cuts a packet when the block changes
        ps = block.page_size
        detect = self.dialect.detect_zero
        sent = 0
        # no per-page Python: a worker thread classifies the next window of dirty pages (numpy)
        # while this one's zero records are written and its packets sent
        windows_send, windows = trio.open_memory_channel[scan.Window](scan.AHEAD)
        done: tuple[int, int] | None = None
        async with trio.open_nursery() as scanning, windows:
            scanning.start_soon(
                partial(scan.produce_windows, detect_zero=detect), block, bitmap, windows_send
            )
            async for start, stop, normal, zero in windows:
                sent += len(zero) + len(normal)
                await state.queue_pages((normal * ps).tolist())
                if len(zero):
                    await self._send_zero(block, zero * ps)
                if done is not None:  # the window before is on its way: let it go
                    self._release(scanning, block, done)
                done = (start, stop)
            if done is not None:
                self._release(scanning, block, done)
        return sent

    async def _send_zero(self, block: RAMBlock, offsets: scan.Indexes) -> None:
        """Zero pages of ``block``: in the packets' zero-page list, or as zero records."""
        if self.dialect.zero_pages_in_packets:
            assert self.state is not None
            await self.state.queue_pages(offsets.tolist(), zero=True)
            return  # counted as their packets are sent
        w = self.writer
        w.zero_pages(block.name, offsets)
        self.stats.add_zero_pages(len(offsets))
        if w.pending() >= MAIN_FLUSH_BYTES:
            await self._flush_main()

    async def _send_dirty(self, last: bool) -> int:
        w = self.writer
        if last:
            w.section_end()
        else:
            w.section_part()
        sent = 0
        digests: dict[str, str] = {}
        # every block's dirty pages, taken at once (QEMU's migration_bitmap_sync): the round's
        # plan, known before its first page (Progress); pages dirtied meanwhile go next round
        bitmaps = [b.sync_dirty_bitmap() for b in self.blocks]
        self.stats.round_start(sum(bitmap.count() for bitmap in bitmaps))
        async with trio.open_nursery() as digesting:
            if last and self.options.verify:  # the content is final: digest it beside the sends
                digesting.start_soon(self._digest, digests)
            for block, bitmap in zip(self.blocks, bitmaps, strict=True):
                sent += await self._send_block(block, bitmap)
            await self._sync()
        w.eos()
        device_state = self.options.device_state
        if last and device_state is None:
            w.eof()
            description = self.options.description
            if description is None and self.options.return_path:  # where its stream ends
                description = b'{"page_size": %d, "devices": []}' % self.page_size
            if self.options.verify:
                description = integrity.with_digests(description, digests)
                self.stats.add_verified_blocks(len(digests))
            if description is not None:
                w.vmdesc(description)
        await self._flush_main()
        if last and device_state is not None:
            # QEMU's device sections, EOF and vmdesc, as saved: the rest of the stream
            await self._send_main(device_state)
        self.stats.round_done()
        return sent

    async def _digest(self, out: dict[str, str]) -> None:
        start = trio.current_time()
        out.update(await integrity.digest_blocks(self.blocks, self.limiter))
        self._digest_seconds = trio.current_time() - start

    async def aclose(self) -> None:
        for ch in self.channels:  # channels whose task never started
            ch.cleanup()
        for io in self.ios:
            await io.aclose()


@asynccontextmanager
async def open_source(
    blocks: Iterable[RAMBlock],
    connect: Connector,
    options: SourceOptions | None = None,
    **changes: Unpack[SourceChanges],
) -> AsyncIterator[Source]:
    """Connect to a destination and set up a migration of ``blocks``.

    ``connect`` is called once for the main channel, then once per multifd channel. Inside the
    block, call ``send_round()`` any number of times (marking pages dirty between rounds), then
    ``complete()``. Leaving the block without ``complete()`` cancels the migration.

    The options (:class:`SourceOptions`: ``channels``, ``method``, ``method_options``, ``uuid``,
    ``machine_type``, ``connect_timeout``, ``idle_timeout``, ``description``, ``device_state``,
    ...) come as ``options``, as keywords (typed: :class:`SourceChanges`), or both (keywords
    win). ``connect_timeout`` bounds each connection; ``idle_timeout`` fails the migration with
    ChannelStalled when a send makes no progress that long (a stalled destination or link;
    None: wait forever); ``deadline`` bounds the whole migration, from here to ``complete()``
    (MigrationTimeout). ``integrity`` (on by default) puts a checksum in every packet,
    ``verify`` sends each block's content digest after the last round; a destination of this
    library checks both (docs/wire-extensions.md).
    """
    check_endpoint(connect, "connector")
    src = Source(list(blocks), connect, SourceOptions.build(options, **changes))
    try:
        with library_errors(src.stats):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(src._watch, name="watchdog")
                await src._setup(nursery)
                yield src
                if not src.completed:
                    src.stats.finish("cancelled")
                nursery.cancel_scope.cancel()  # the watchdog, or everything when cancelled
    except ChannelError as exc:
        await src.explain(exc)
        raise
    finally:
        await src.aclose()


async def migrate(
    blocks: Iterable[RAMBlock],
    connect: Connector,
    options: SourceOptions | None = None,
    *,
    rounds: int = 1,
    **changes: Unpack[SourceChanges],
) -> MigrationStats:
    """Migrate ``blocks`` in ``rounds`` rounds (the last one completes); returns the stats.
    ``options`` and keywords as for :func:`open_source`."""
    if rounds < 1:
        raise ConfigError("rounds must be >= 1")
    async with open_source(blocks, connect, options, **changes) as src:
        for _ in range(rounds - 1):
            await src.send_round()
        return await src.complete()
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["MAIN_FLUSH_BYTES", "Source", "migrate", "open_source"]
