"""The receiving end of a migration: accepting connections, the main channel, the drain.

``open_destination`` is an async context manager for embedding in a trio program; ``receive``
runs a whole migration in one call. Connections arrive in any order: each is accepted and
classified from its first bytes (``accept.py``, ``handshake.py``; a connection that is not this
migration's is closed with a warning, and the migration goes on), the main channel's stream is
parsed (``mainstream``) and its events dispatched here, the multifd channels read packets
(``recv.py``) into the blocks (``landing.py``). Any failure ends every task and socket and
surfaces as one exception of this library.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Unpack

import trio

from . import integrity, landing
from . import mainstream as ms
from . import returnpath as rp
from .accept import Connections, serving
from .blocks import BlockFactory, allocate_block, check_total, take_block
from .boundary import library_errors
from .endpoints import Acceptor, check_endpoint
from .errors import (
    ChannelClosed,
    LimitExceeded,
    MigrationTimeout,
    MultiFDError,
    TruncatedStream,
)
from .extension import MULTIFD_EXT_PACKET_CHECKSUM
from .handshake import Handshake, MainChannel, MultiFDChannel
from .options import DestinationChanges, DestinationOptions
from .ram import RAMBlock
from .recv import MultiFDRecvChannel, MultiFDRecvState, payload_bounds, recv_setup
from .stats import MigrationStats, Progress
from .transport import ChannelIO
from .watchdog import deadline_watch, watchdog
from .wire import PacketRules, pages_per_packet

#: Seconds a failed destination waits after its SHUT before closing (see ``_shut_failed``).
SHUT_GRACE = 0.1


class Destination:
    """The receiving end. Made by :func:`open_destination`; not constructed directly."""

    def __init__(
        self,
        accept: Acceptor,
        options: DestinationOptions,
        *,
        blocks: Mapping[str, RAMBlock] | None = None,
        block_factory: BlockFactory = allocate_block,
    ) -> None:
        self.accept = accept
        self.options = options
        self.num_channels = options.channels
        self.method = options.resolve_method()
        self.given_blocks = blocks
        self.block_factory = block_factory
        self.page_size = options.page_size
        self.limiter = trio.CapacityLimiter(options.threads)
        self.stats = MigrationStats(
            "destination", self.num_channels, self.method.name, self.page_size
        )
        self.rules = PacketRules(
            page_size=self.page_size,
            max_pages=pages_per_packet(self.page_size),
            compression=self.method.value,
            payload_size=payload_bounds(self.method),
            zero_pages_field=options.zero_page_packets,
        )
        self.state = MultiFDRecvState(self.num_channels, self.rules, self.stats)
        self.handshakes = Handshake(self.num_channels, options.uuid_bytes)
        self.connections = Connections(
            accept, self.handshakes, options, self.stats, self._run_connection
        )
        #: the connections that identified themselves (main and multifd channels)
        self.ios: list[ChannelIO] = self.connections.ios
        self.main: ChannelIO | None = None
        self.blocks: dict[str, RAMBlock] = {}
        self.machine_type: str | None = None
        self.configuration: ms.Configuration | None = None
        self.device_state: list[bytes] = []
        self.ram_section_id: int | None = None
        self.vmdesc: bytes | None = None
        #: where the source synced its channels (ms.QEMU_FLUSH_*), once its setup told
        self.flush: str | None = None
        #: the QEMU_VM_COMMANDs of the main stream, in order (ms.MIG_CMD_NAMES)
        self.commands: list[int] = []
        #: the source opened a return path (MIG_CMD_OPEN_RETURN_PATH): PONGs and SHUT go back
        self.return_path = False
        self.shut_sent: int | None = None  # the status of the SHUT written, once it was
        #: every page has landed: the stream completed (with a return path, before the SHUT
        #: that confirms it, which goes when the program leaves the block: ``confirm``)
        self.landed = trio.Event()
        self.done = trio.Event()
        self._verified = False  # the content digests were checked (_verify)
        self._watching = trio.CancelScope()
        self._on_event: dict[type[Any], Callable[[Any], Awaitable[None] | None]] = {
            ms.ZeroPages: self._on_zero_pages,
            ms.ZeroPage: self._on_zero_page,
            ms.RoundEnd: self._on_round_end,
            ms.Command: self._on_command,
            ms.Page: self._on_page,
            ms.RamBlocks: self._on_ram_blocks,
            ms.Configuration: self._on_configuration,
            ms.DeviceState: self._on_device_state,
            ms.VmDescription: self._on_vmdesc,
            ms.StreamComplete: self._on_stream_complete,
        }

    @property
    def uuid(self) -> bytes | None:
        """The uuid every channel must carry, when this side was given one."""
        return self.options.uuid_bytes

    @property
    def source_uuid(self) -> bytes | None:
        """The uuid the source's channels carry (known after the first channel's handshake)."""
        return self.handshakes.source_uuid

    def progress(self) -> Progress:
        """Where the migration is: pages received (packet by packet) in this round and in all,
        against the RAM announced (a snapshot; see :class:`Progress` for what the destination
        can know of the source's plan)."""
        return self.stats.progress()

    async def wait(self) -> MigrationStats:
        """Wait until the migration has completed (every page landed); returns the stats.

        With a source that opened a return path, the SHUT that tells it so goes only when the
        program leaves ``open_destination``'s block: work done there on the blocks (a
        receiver's renames) that fails still fails the source."""
        await self.landed.wait()
        return self.stats

    async def confirm(self) -> None:
        """Leaving the block: wait until every page landed, confirm it to a source with a
        return path (SHUT success), and give it ``drain_timeout`` to close its channels."""
        await self.landed.wait()
        if self.return_path and self.shut_sent is None:
            await self._shut(rp.RP_SUCCESS)
        drain = self.options.drain_timeout
        try:
            with trio.fail_after(drain):
                await self.done.wait()
        except trio.TooSlowError:
            raise MigrationTimeout(
                f"the source did not close its channels within {drain} s of the end"
            ) from None

    # --- connections ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """The watchdog and the deadline, until the migration completed (``_finish``)."""
        idle, deadline = self.options.idle_timeout, self.options.deadline
        with self._watching:
            async with trio.open_nursery() as nursery:
                if idle is not None:
                    nursery.start_soon(watchdog, self.ios, idle, name="watchdog")
                if deadline is not None:
                    nursery.start_soon(deadline_watch, deadline, "destination", name="deadline")

    async def _run(self, nursery: trio.Nursery) -> None:
        self.stats.start()
        await self.connections.run(nursery)

    async def _run_connection(self, io: ChannelIO, conn: MainChannel | MultiFDChannel) -> None:
        """An identified connection (``accept.py``), run to its end."""
        if isinstance(conn, MainChannel):
            self.main = io
            await self._main_loop(io)
            return
        ch = MultiFDRecvChannel(
            conn.id,
            io,
            self.method,
            recv_setup(self.method, conn.id),
            self.state,
            self.limiter,
            checksums=bool(conn.features & MULTIFD_EXT_PACKET_CHECKSUM),  # integrity.py
            rules=self._channel_rules(conn),
        )
        self.state.channels[conn.id] = ch
        await ch.multifd_recv_thread()

    def _channel_rules(self, conn: MultiFDChannel) -> PacketRules:
        """The rules of a channel's packets: QEMU's size, or the one its init packet announced
        (within ``max_packet_size``)."""
        pages = conn.packet_pages
        if not pages or pages == self.rules.max_pages:
            return self.rules
        size, limit = pages * self.page_size, self.options.max_packet_size
        if size > limit and pages > self.rules.max_pages:
            raise LimitExceeded(
                f"packets of {pages} pages ({size} bytes) announced, above max_packet_size {limit}",
                channel=conn.id,
            )
        return replace(self.rules, max_pages=pages)

    # --- the main channel -------------------------------------------------------------------

    async def _main_loop(self, io: ChannelIO) -> None:
        parser = ms.MainStreamParser(
            page_size=self.page_size,
            max_device_state=self.options.max_device_state,
            max_blocks=self.options.max_blocks,
            batch_zero_pages=True,
        )
        while True:
            try:
                ev = parser.next_event()
            except TruncatedStream as exc:
                why = f"closed early: {exc}{self.connections.refusals()}"
                raise ChannelClosed(why, channel=None) from None
            if ev is ms.NEED_DATA:
                data = await io.receive_some()
                if data:
                    self.stats.add_main_bytes(len(data))
                    parser.feed(data)
                else:
                    parser.feed_eof()
            elif isinstance(ev, ms.ConnectionEnd):
                self.flush = parser.flush
                break
            else:
                handler = self._on_event.get(type(ev))
                if handler is not None:
                    pending = handler(ev)
                    if pending is not None:
                        await pending
        await self._finish()

    def _on_zero_pages(self, ev: ms.ZeroPages) -> None:
        landing.fill_pages(self.blocks[ev.block], ev.offsets, ev.fills)
        self.stats.add_zero_pages(len(ev.offsets))

    def _on_zero_page(self, ev: ms.ZeroPage) -> None:
        landing.fill_page(self.blocks[ev.block], ev.offset, ev.fill)
        self.stats.add_zero_pages(1)

    async def _on_round_end(self, ev: ms.RoundEnd) -> None:
        await self.state.recv_sync_main()
        if ev.kind != ms.QEMU_VM_SECTION_START:  # the setup's sync is not a round
            self.stats.round_done()

    def _on_command(self, ev: ms.Command) -> Awaitable[None] | None:
        self.commands.append(ev.command)
        if ev.command == ms.MIG_CMD_OPEN_RETURN_PATH:
            self.return_path = True
        elif ev.command == ms.MIG_CMD_PING:
            return self._send_rp(rp.pong(ev.data))
        return None

    async def _send_rp(self, message: bytes) -> None:
        """A return-path message, on the main channel's connection back to the source."""
        assert self.main is not None
        await self.main.send_all(message)

    async def _shut(self, status: int) -> None:
        self.shut_sent = status
        await self._send_rp(rp.shut(status))

    async def _on_stream_complete(self, ev: ms.StreamComplete) -> None:
        """The source sent all and waits for SHUT to close: every page has landed, as the
        RAM END section's sync barrier passed. ``confirm`` sends the SHUT; until then no page
        may come, and the watchdog and the deadline are over (the program's own work on the
        blocks may take its time)."""
        await self._verify()  # the content digests agree before anything counts as landed
        self.state.completed = True  # no page may come now: the contexts can go (recv_cleanup)
        self.state.cleanup_all()
        self._landed()

    def _landed(self) -> None:
        self.state.completed = True
        self._watching.cancel()
        self.stats.finish("completed")
        self.landed.set()

    async def _verify(self) -> None:
        """Every page landed: check the source's content digests, once (integrity.py)."""
        if not self._verified:
            self._verified = True
            checked = await integrity.verify_blocks(
                self.blocks, self.vmdesc, self.limiter, required=self.options.verify
            )
            self.stats.add_verified_blocks(checked)

    def _on_page(self, ev: ms.Page) -> None:
        landing.put_page(self.blocks[ev.block], ev.offset, ev.data)
        self.stats.add_inline_pages(1)

    def _on_ram_blocks(self, ev: ms.RamBlocks) -> None:
        self.ram_section_id = ev.section_id
        self._setup_blocks(ev.blocks)

    def _on_configuration(self, ev: ms.Configuration) -> None:
        self.machine_type = ev.machine_type
        self.configuration = ev

    def _on_device_state(self, ev: ms.DeviceState) -> None:
        self.device_state.append(ev.data)

    def _on_vmdesc(self, ev: ms.VmDescription) -> None:
        self.vmdesc = ev.json

    def _setup_blocks(self, announced: Sequence[tuple[str, int]]) -> None:
        total = check_total(announced, self.options.max_total_bytes)
        blocks = {
            name: take_block(name, size, self.page_size, self.given_blocks, self.block_factory)
            for name, size in announced
        }
        self.blocks = blocks
        self.state.set_blocks(blocks)
        self.stats.start(total)

    async def _finish(self) -> None:
        """The main stream ended: drain the channels, hear out late handshakes, complete."""
        self.state.completed = True
        drain = self.options.drain_timeout
        try:
            with trio.fail_after(drain):
                await self.state.wait_all_closed()
        except trio.TooSlowError:
            raise MigrationTimeout(
                f"channels still open {drain} s after the end of the migration"
            ) from None
        self.state.check_cleanups()
        await self._verify()  # every page landed
        await trio.sleep(0)  # let the accept loop take what is already in the backlog
        await self.connections.stop()  # and hear out the handshakes still pending
        self._landed()
        self.done.set()

    async def aclose(self) -> None:
        if self.return_path and self.shut_sent is None and not self.done.is_set():
            await self._shut_failed()
        for io in self.ios:
            await io.aclose()

    async def _shut_failed(self) -> None:
        """The migration failed: tell the source (SHUT with a failure status), bounded, even
        when this end is being cancelled; a source already gone is no further error."""
        deadline = trio.current_time() + self.options.return_path_timeout
        with trio.CancelScope(deadline=deadline, shield=True):
            try:
                await self._shut(rp.RP_FAILURE)
            except MultiFDError:
                return
            # closing with the source's bytes unread resets the connection, and a reset drops
            # what the source has not read yet: let its return-path reader take the SHUT first
            await trio.sleep(SHUT_GRACE)


@asynccontextmanager
async def open_destination(
    accept: Acceptor,
    options: DestinationOptions | None = None,
    *,
    blocks: Iterable[RAMBlock] | Mapping[str, RAMBlock] | None = None,
    block_factory: BlockFactory = allocate_block,
    **changes: Unpack[DestinationChanges],
) -> AsyncIterator[Destination]:
    """Accept a migration: the main channel and ``channels`` multifd channels, in any order.

    Blocks come from ``blocks`` (names and sizes must match the source's) or are made by
    ``block_factory(name, size, page_size)`` (default: zero-filled anonymous memory). The options
    (:class:`DestinationOptions`) come as ``options``, as keywords (typed:
    :class:`DestinationChanges`), or both (keywords win): ``uuid``, when given, must match every
    channel's. An acceptor serves one destination at a time (ConfigError for a second one
    while this one is open). ``await dst.wait()`` waits until every page
    landed and returns the stats; leaving the block waits for that too, then confirms it to a
    source with a return path (its SHUT) and lets the channels close: what the program does
    with the blocks inside the block, after ``wait()``, decides what the source is told.

    Connections that are not this migration's (end of stream or silence before their first
    message, neither magic, a failed TLS handshake, another migration's uuid, a bad init packet,
    a second main channel) are closed with a warning on the ``multifd_core.accept`` logger and
    the migration goes on; at most ``max_pending_handshakes`` handshakes run at once (one more
    drops the oldest). Fatal: a channel of this migration's uuid with an id beyond ``channels``
    (BadChannelId) or one already taken (DuplicateChannel); ``connect_timeout`` counts only
    the connections that identified themselves. See ``accept.py``.

    Limits (each breach is a typed error naming it): ``connect_timeout`` for all connections to
    arrive, ``handshake_timeout`` for each connection's first bytes, ``idle_timeout`` for a
    channel that stops moving bytes (ChannelStalled; None: wait forever — the source must not
    pause longer than this between rounds), ``drain_timeout`` for the channels to close at the
    end, ``deadline`` for the whole migration (MigrationTimeout, however steadily the source
    trickles), ``max_blocks`` and ``max_total_bytes`` for the RAM the source may announce
    (LimitExceeded), ``max_device_state`` for the bytes after the RAM section.
    """
    check_endpoint(accept, "acceptor")
    opts = DestinationOptions.build(options, **changes)
    given: dict[str, RAMBlock] | None = None
    if blocks is not None:
        given = dict(blocks) if isinstance(blocks, Mapping) else {b.name: b for b in blocks}
    with serving(accept):
        dst = Destination(accept, opts, blocks=given, block_factory=block_factory)
        try:
            with library_errors(dst.stats):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(dst._watch, name="watchdog")
                    nursery.start_soon(dst._run, nursery)
                    yield dst
                    await dst.confirm()
        finally:
            await dst.aclose()


async def receive(
    accept: Acceptor,
    options: DestinationOptions | None = None,
    *,
    blocks: Iterable[RAMBlock] | Mapping[str, RAMBlock] | None = None,
    block_factory: BlockFactory = allocate_block,
    **changes: Unpack[DestinationChanges],
) -> tuple[MigrationStats, dict[str, RAMBlock]]:
    """Receive one whole migration; returns the stats and the blocks by name. The arguments
    are those of :func:`open_destination`."""
    async with open_destination(
        accept, options, blocks=blocks, block_factory=block_factory, **changes
    ) as dst:
        await dst.wait()
    return dst.stats, dst.blocks


__all__ = [
    "BlockFactory",
    "Destination",
    "allocate_block",
    "open_destination",
    "receive",
]
