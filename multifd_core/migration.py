"""The two ends of a migration: one nursery each, the round loop, and the main channel.

``open_source`` and ``open_destination`` are async context managers for embedding in a trio
program; ``migrate`` and ``receive`` run a whole migration in one call. Everything a migration
starts (channel tasks, sockets, worker-thread jobs) lives inside the context; any failure ends all
of it and surfaces as one exception of this library (``multifd_core.errors``), never as a raw
ExceptionGroup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from . import mainstream as ms
from . import scan
from .errors import (
    BadMagic,
    BlockMismatch,
    ChannelClosed,
    ChannelError,
    ChannelStalled,
    ConfigError,
    DuplicateChannel,
    LimitExceeded,
    MainStreamError,
    MigrationTimeout,
    MultiFDError,
    ProtocolError,
    TLSError,
    TruncatedStream,
    UuidMismatch,
)
from .methods import MethodRegistry, MultiFDMethod, load_methods
from .ram import RAMBlock
from .recv import MultiFDRecvChannel, MultiFDRecvState
from .send import MultiFDSendChannel, MultiFDSendState, default_thread_limit
from .stats import MigrationStats
from .transport import ChannelIO, Connector
from .watchdog import watchdog
from .wire import (
    MAX_CHANNELS,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC_BYTES,
    MultiFDInit,
    PacketRules,
    decode_init,
    pages_per_packet,
    uuid_bytes,
)

Acceptor = Callable[[], Any]  # async () -> trio.abc.Stream
BlockFactory = Callable[[str, int, int], RAMBlock]

#: Main-channel bytes buffered before they are written out mid-round.
MAIN_FLUSH_BYTES = 256 * 1024
QEVM = b"QEVM"


# --- errors at the API boundary -------------------------------------------------------------


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def _rank(exc: BaseException) -> int:
    if isinstance(exc, ProtocolError):
        return 0  # the root cause: what the peer did wrong
    if isinstance(exc, ChannelStalled | TLSError):
        return 1  # found by this side (watchdog, TLS check): a cause, not a consequence
    if isinstance(exc, ChannelError):
        return 2  # often only a consequence of the other end stopping
    return 1


def pick_error(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one exception a group stands for, or None when it must stay a group."""
    real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    if not real:
        return None
    if all(isinstance(e, MultiFDError) for e in real):
        return min(real, key=_rank)
    if len(real) == 1:
        return real[0]
    return None


@contextmanager
def library_errors(stats: MigrationStats | None = None) -> Iterator[None]:
    """Unwrap the nursery's ExceptionGroups into the library's own exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        picked = pick_error(group)
        if stats is not None:
            if picked is None and all(isinstance(e, trio.Cancelled) for e in _leaves(group)):
                stats.finish("cancelled")
            else:
                stats.finish("failed", picked or group)
        if picked is None:
            raise
        raise picked from None
    except trio.Cancelled:
        if stats is not None:
            stats.finish("cancelled")
        raise
    except BaseException as exc:
        if stats is not None:
            stats.finish("failed", exc)
        raise


def _resolve_method(
    method: str | int | MultiFDMethod,
    options: Mapping[str, Any] | None,
    registry: MethodRegistry | None,
) -> MultiFDMethod:
    if isinstance(method, MultiFDMethod):
        if options:
            raise ConfigError("options go to the method object itself")
        return method
    reg = registry if registry is not None else load_methods()
    return reg.create(method, **dict(options or {}))


def _check_timeout(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{name} must be > 0 (or None), not {value}")


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise ConfigError(f"channel count {channels} outside 1..{MAX_CHANNELS}")


# --- source -------------------------------------------------------------------------------


class Source:
    """The sending end. Made by :func:`open_source`; not constructed directly."""

    def __init__(
        self,
        blocks: Sequence[RAMBlock],
        connect: Connector,
        *,
        channels: int,
        method: MultiFDMethod,
        uuid: bytes,
        machine_type: str,
        thread_limit: int,
        description: bytes | None = None,
        section_id: int = 2,
        device_state: bytes | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        self.blocks = list(blocks)
        self.connect_timeout = connect_timeout
        self.description = description
        self.device_state = device_state
        self.connect = connect
        self.num_channels = channels
        self.method = method
        self.uuid = uuid
        self.page_size = self.blocks[0].page_size
        self.pages_per_packet = pages_per_packet(self.page_size)
        self.stats = MigrationStats("source", channels, method.name, self.page_size)
        self.stats.total_bytes = sum(b.size for b in self.blocks)
        self.writer = ms.MainStreamWriter(
            machine_type=machine_type, section_id=section_id, page_size=self.page_size
        )
        self.limiter = trio.CapacityLimiter(thread_limit)
        self.ios: list[ChannelIO] = []
        self.channels: list[MultiFDSendChannel] = []
        self.main: ChannelIO | None = None
        self.state: MultiFDSendState | None = None
        self.completed = False
        self._busy = False

    async def _connect(self, channel: int | None) -> ChannelIO:
        name = "main channel" if channel is None else f"channel {channel}"
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await self.connect()
        except trio.TooSlowError:
            raise MigrationTimeout(
                f"cannot connect the {name} within {self.connect_timeout} s"
            ) from None
        except OSError as exc:
            raise ChannelError(f"cannot connect the {name}: {exc}", channel=channel) from exc
        except ChannelError as exc:  # from the connector itself (TLS): say which channel
            exc.channel = channel
            raise
        io = ChannelIO(stream, channel)
        self.ios.append(io)
        return io

    async def _setup(self, nursery: trio.Nursery) -> None:
        self.main = await self._connect(None)
        chans = self.channels
        for i in range(self.num_channels):
            io = await self._connect(i)
            await io.send_all(MultiFDInit(i, self.uuid).encode())  # QEMU reads it at accept
            chans.append(
                MultiFDSendChannel(
                    i,
                    io,
                    self.method,
                    self.method.send_setup(i),
                    self.pages_per_packet,
                    self.stats,
                    self.limiter,
                )
            )
        self.state = MultiFDSendState(chans, self.pages_per_packet)
        self.state.start(nursery)
        self.stats.status = "active"
        w = self.writer
        w.header()
        w.ram_setup([(b.name, b.size) for b in self.blocks])
        await self._flush_main()
        for b in self.blocks:
            b.mark_all_dirty()  # the first round sends every page
        await self.state.send_sync_main()
        w.eos()
        await self._flush_main()

    async def _flush_main(self) -> None:
        assert self.main is not None
        data = self.writer.take()
        if data:
            await self.main.send_all(data)
            self.stats.main_bytes += len(data)

    def dirty_pages(self) -> int:
        """Pages marked dirty and not yet sent."""
        return sum(b.dirty_count() for b in self.blocks)

    async def send_round(self) -> int:
        """Send every page dirtied since the last round (all pages the first time), then sync.

        Returns the number of pages sent. Call ``complete()`` for the last round.
        """
        return await self._round(last=False)

    async def complete(self) -> MigrationStats:
        """The last round: remaining dirty pages, the end section, EOF; then close the channels."""
        await self._round(last=True)
        assert self.state is not None
        await self.state.quit()
        await self.aclose()  # the end of every stream tells the destination we are done
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

    def _progress(self, sent: int) -> None:
        stats = self.stats
        stats.dirty_pages_remaining -= sent - stats.pages_this_round
        stats.pages_this_round = sent

    @staticmethod
    def _release(nursery: trio.Nursery, block: RAMBlock, pages: tuple[int, int]) -> None:
        """Let ``block`` drop a window of sent pages, in a worker thread: unmapping 64 MiB
        costs ~6 ms (a file mapping), which the event loop would spend instead of sending."""
        ps = block.page_size
        nursery.start_soon(trio.to_thread.run_sync, block.release, pages[0] * ps, pages[1] * ps)

    async def _send_dirty(self, last: bool) -> int:
        state = self.state
        assert state is not None
        w = self.writer
        stats = self.stats
        if last:
            w.section_end()
        else:
            w.section_part()
        sent = 0
        stats.pages_this_round = 0
        stats.dirty_pages_remaining = self.dirty_pages()
        for block in self.blocks:
            await state.set_block(block)  # QEMU cuts a packet when the block changes
            bitmap = block.sync_dirty_bitmap()
            ps = block.page_size
            # no per-page Python: a worker thread classifies the next window of dirty pages
            # (numpy) while this one's zero records are written and its packets sent
            windows_send, windows = trio.open_memory_channel[scan.Window](scan.AHEAD)
            done: tuple[int, int] | None = None
            async with trio.open_nursery() as scanning, windows:
                scanning.start_soon(scan.produce_windows, block, bitmap, windows_send)
                async for start, stop, normal, zero in windows:
                    if len(zero):
                        w.zero_pages(block.name, zero * ps)
                        stats.zero_pages += len(zero)
                        if w.pending() >= MAIN_FLUSH_BYTES:
                            await self._flush_main()
                    sent += len(zero) + len(normal)
                    await state.queue_pages((normal * ps).tolist())
                    self._progress(sent)
                    if done is not None:  # the window before is on its way: let it go
                        self._release(scanning, block, done)
                    done = (start, stop)
                if done is not None:
                    self._release(scanning, block, done)
        await state.send_sync_main()
        w.eos()
        if last and self.device_state is None:
            w.eof()
            if self.description is not None:
                w.vmdesc(self.description)
        await self._flush_main()
        if last and self.device_state is not None:
            # QEMU's device sections, EOF and vmdesc, as saved: the rest of the stream
            assert self.main is not None
            await self.main.send_all(self.device_state)
            self.stats.main_bytes += len(self.device_state)
        stats.rounds += 1
        return sent

    async def aclose(self) -> None:
        for ch in self.channels:  # channels whose task never started
            ch.cleanup()
        for io in self.ios:
            await io.aclose()


@asynccontextmanager
async def open_source(
    blocks: Iterable[RAMBlock],
    connect: Connector,
    *,
    channels: int = 2,
    method: str | int | MultiFDMethod = "none",
    method_options: Mapping[str, Any] | None = None,
    registry: MethodRegistry | None = None,
    uuid: str | bytes | None = None,
    machine_type: str = "pc-q35-7.2",
    thread_limit: int | None = None,
    description: bytes | None = None,
    section_id: int = 2,
    device_state: bytes | None = None,
    connect_timeout: float = 30.0,
    idle_timeout: float | None = 60.0,
) -> AsyncIterator[Source]:
    """Connect to a destination and set up a migration of ``blocks``.

    ``connect`` is called once for the main channel, then once per multifd channel. Inside the
    block, call ``send_round()`` any number of times (marking pages dirty between rounds), then
    ``complete()``. Leaving the block without ``complete()`` cancels the migration.
    ``description`` (JSON bytes) is sent after EOF where QEMU puts its vmdesc.
    ``device_state``, when given, replaces EOF: the bytes QEMU sends after its RAM section
    (device sections, EOF, vmdesc), as ``Destination.device_state`` captured them;
    ``section_id`` is the RAM section's id (QEMU's own, when replaying a capture).
    ``connect_timeout`` bounds each connection; ``idle_timeout`` fails the migration with
    ChannelStalled when a send makes no progress that long (a stalled destination or link;
    None: wait forever).
    """
    blocks = list(blocks)
    _check_channels(channels)
    if not blocks:
        raise ConfigError("nothing to migrate: no blocks")
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate block names in {names}")
    if len({b.page_size for b in blocks}) != 1:
        raise ConfigError("all blocks of a migration must have the same page size")
    src = Source(
        blocks,
        connect,
        channels=channels,
        method=_resolve_method(method, method_options, registry),
        uuid=uuid_bytes(uuid),
        machine_type=machine_type,
        thread_limit=thread_limit or default_thread_limit(),
        description=description,
        section_id=section_id,
        device_state=device_state,
        connect_timeout=connect_timeout,
    )
    _check_timeout("idle_timeout", idle_timeout)
    try:
        with library_errors(src.stats):
            async with trio.open_nursery() as nursery:
                if idle_timeout is not None:
                    nursery.start_soon(watchdog, src.ios, idle_timeout, name="watchdog")
                await src._setup(nursery)
                yield src
                if not src.completed:
                    src.stats.finish("cancelled")
                nursery.cancel_scope.cancel()  # the watchdog, or everything when cancelled
    finally:
        await src.aclose()


async def migrate(
    blocks: Iterable[RAMBlock], connect: Connector, *, rounds: int = 1, **options: Any
) -> MigrationStats:
    """Migrate ``blocks`` in ``rounds`` rounds (the last one completes); returns the stats."""
    if rounds < 1:
        raise ConfigError("rounds must be >= 1")
    async with open_source(blocks, connect, **options) as src:
        for _ in range(rounds - 1):
            await src.send_round()
        return await src.complete()
    raise AssertionError("unreachable")  # pragma: no cover


# --- destination --------------------------------------------------------------------------


def allocate_block(name: str, size: int, page_size: int) -> RAMBlock:
    return RAMBlock.allocate(name, size, page_size)


class Destination:
    """The receiving end. Made by :func:`open_destination`; not constructed directly."""

    def __init__(
        self,
        accept: Acceptor,
        *,
        channels: int,
        method: MultiFDMethod,
        blocks: Mapping[str, RAMBlock] | None,
        block_factory: BlockFactory,
        uuid: bytes | None,
        page_size: int,
        connect_timeout: float,
        handshake_timeout: float,
        drain_timeout: float,
        thread_limit: int,
        max_device_state: int | None,
        idle_timeout: float | None = None,
        max_blocks: int = 4096,
        max_total_bytes: int | None = None,
    ) -> None:
        self.accept = accept
        self.idle_timeout = idle_timeout
        self.max_blocks = max_blocks
        self.max_total_bytes = max_total_bytes
        self._watching = trio.CancelScope()
        self.num_channels = channels
        self.method = method
        self.given_blocks = blocks
        self.block_factory = block_factory
        self.uuid = uuid
        self.page_size = page_size
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.drain_timeout = drain_timeout
        self.max_device_state = max_device_state
        self.limiter = trio.CapacityLimiter(thread_limit)
        self.stats = MigrationStats("destination", channels, method.name, page_size)
        max_pages = pages_per_packet(page_size)
        self.rules = PacketRules(
            page_size=page_size,
            max_pages=max_pages,
            compression=method.value,
            payload_size=method.payload_size,
        )
        self.state = MultiFDRecvState(channels, self.rules, self.stats)
        self.ios: list[ChannelIO] = []
        self.main: ChannelIO | None = None
        self.blocks: dict[str, RAMBlock] = {}
        self.machine_type: str | None = None
        self.configuration: Any = None
        self.device_state: list[bytes] = []
        self.source_uuid: bytes | None = None
        self.ram_section_id: int | None = None
        self.vmdesc: bytes | None = None
        self.done = trio.Event()
        self._accepting = trio.CancelScope()
        self._handshakes = 0
        self._handshakes_done = trio.Event()

    async def wait(self) -> MigrationStats:
        """Wait until the migration has completed; returns the stats."""
        await self.done.wait()
        return self.stats

    async def _watch(self) -> None:
        if self.idle_timeout is not None:
            with self._watching:
                await watchdog(self.ios, self.idle_timeout)

    async def _run(self, nursery: trio.Nursery) -> None:
        self.stats.status = "active"
        with trio.move_on_after(self.connect_timeout) as scope:
            for _ in range(self.num_channels + 1):
                stream = await self.accept()
                nursery.start_soon(self._handshake, stream, nursery)
        if scope.cancelled_caught:
            raise MigrationTimeout(
                f"only {len(self.ios)} of {self.num_channels + 1} connections (main + "
                f"{self.num_channels} channels) arrived within {self.connect_timeout} s"
            )
        # Keep accepting until the migration ends: a connection beyond main + N channels (a
        # source with more channels than this side) must fail the migration with the reason,
        # not sit unread in the listen backlog with its pages silently lost.
        with self._accepting:
            while True:
                stream = await self.accept()
                nursery.start_soon(self._handshake, stream, nursery)

    async def _handshake(self, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        io = ChannelIO(stream, None)
        self.ios.append(io)
        self._handshakes += 1
        self._handshakes_done = trio.Event()
        try:
            with trio.fail_after(self.handshake_timeout):
                await io.handshake()  # TLS: here, in this connection's task, bounded
                magic = await io.receive_exactly(4, "the first bytes of a connection")
                if magic == MULTIFD_MAGIC_BYTES:
                    rest = await io.receive_exactly(MULTIFD_INIT_SIZE - 4, "the init packet")
        except trio.TooSlowError:
            raise MigrationTimeout(
                f"a connection sent no handshake within {self.handshake_timeout} s"
            ) from None
        finally:
            self._handshakes -= 1
            if not self._handshakes:
                self._handshakes_done.set()
        if magic == QEVM:
            if self.main is not None:
                raise MainStreamError("a second main channel (QEVM) connected")
            self.main = io
            io.unread(magic)
            await self._main_loop(io)
        elif magic == MULTIFD_MAGIC_BYTES:
            init = decode_init(
                bytes(magic + rest), num_channels=self.num_channels, expected_uuid=self.uuid
            )
            if self.source_uuid is None:
                self.source_uuid = init.uuid
            elif init.uuid != self.source_uuid:
                raise UuidMismatch(
                    f"channel {init.id} has uuid {init.uuid.hex()}, channel(s) before it "
                    f"{self.source_uuid.hex()}",
                    channel=init.id,
                )
            if init.id in self.state.channels:
                raise DuplicateChannel(f"two channels announced id {init.id}", channel=init.id)
            io.channel = init.id
            ch = MultiFDRecvChannel(
                init.id,
                io,
                self.method,
                self.method.recv_setup(init.id),
                self.state,
                self.limiter,
            )
            self.state.channels[init.id] = ch
            await ch.multifd_recv_thread()
        else:
            tls = " (a TLS handshake: the peer uses TLS, this side does not)"
            raise BadMagic(
                f"a connection starts with {bytes(magic).hex()}: neither a main channel "
                f"({QEVM.hex()}) nor a multifd channel ({MULTIFD_MAGIC_BYTES.hex()})"
                + (tls if magic[:2] == b"\x16\x03" else "")
            )

    def _setup_blocks(self, announced: Sequence[tuple[str, int]]) -> None:
        blocks: dict[str, RAMBlock] = {}
        total = sum(size for _, size in announced)
        if self.max_total_bytes is not None and total > self.max_total_bytes:
            raise LimitExceeded(
                f"the source announces {total} bytes of RAM in {len(announced)} block(s), "
                f"more than the {self.max_total_bytes} allowed here"
            )
        for name, size in announced:
            if self.given_blocks is not None:
                block = self.given_blocks.get(name)
                if block is None:
                    raise BlockMismatch(f"the source migrates block {name!r}, unknown here")
                if block.size != size:
                    raise BlockMismatch(
                        f"block {name!r} is {size} bytes at the source, {block.size} here"
                    )
            else:
                try:
                    block = self.block_factory(name, size, self.page_size)
                except (OSError, MemoryError, OverflowError) as exc:
                    raise LimitExceeded(
                        f"cannot allocate block {name!r} of {size} bytes: {exc}"
                    ) from exc
            if not block.writable:
                raise ConfigError(f"block {name!r} is read-only: cannot receive into it")
            if block.page_size != self.page_size:
                raise ConfigError(f"block {name!r} has page size {block.page_size}")
            blocks[name] = block
        self.blocks = blocks
        self.state.set_blocks(blocks)
        self.stats.total_bytes = sum(size for _, size in announced)

    async def _main_loop(self, io: ChannelIO) -> None:
        parser = ms.MainStreamParser(
            page_size=self.page_size,
            max_device_state=self.max_device_state,
            max_blocks=self.max_blocks,
            batch_zero_pages=True,
        )
        state = self.state
        stats = self.stats
        while True:
            try:
                ev = parser.next_event()
            except TruncatedStream as exc:
                raise ChannelClosed(f"closed early: {exc}", channel=None) from None
            if ev is ms.NEED_DATA:
                data = await io.receive_some()
                if data:
                    stats.main_bytes += len(data)
                    parser.feed(data)
                else:
                    parser.feed_eof()
                continue
            if isinstance(ev, ms.ZeroPages):
                self.blocks[ev.block].fill_pages(ev.offsets, ev.fills)
                stats.zero_pages += len(ev.offsets)
            elif isinstance(ev, ms.ZeroPage):
                self.blocks[ev.block].fill_page(ev.offset, ev.fill)
                stats.zero_pages += 1
            elif isinstance(ev, ms.RoundEnd):
                await state.recv_sync_main()
            elif isinstance(ev, ms.Page):
                block = self.blocks[ev.block]
                block.note_written((ev.offset,))
                block.host[ev.offset : ev.offset + self.page_size] = ev.data
                stats.inline_pages += 1
            elif isinstance(ev, ms.RamBlocks):
                self.ram_section_id = ev.section_id
                self._setup_blocks(ev.blocks)
            elif isinstance(ev, ms.Configuration):
                self.machine_type = ev.machine_type
                self.configuration = ev
            elif isinstance(ev, ms.DeviceState):
                self.device_state.append(ev.data)
            elif isinstance(ev, ms.VmDescription):
                self.vmdesc = ev.json
            elif isinstance(ev, ms.ConnectionEnd):
                break
        state.completed = True
        try:
            with trio.fail_after(self.drain_timeout):
                await state.wait_all_closed()
        except trio.TooSlowError:
            raise MigrationTimeout(
                f"channels still open {self.drain_timeout} s after the end of the migration"
            ) from None
        # a connection still in its handshake may be an extra channel: hear it out first
        with trio.move_on_after(self.handshake_timeout):
            while self._handshakes:
                await self._handshakes_done.wait()
        await trio.sleep(0)  # let the accept loop take what is already in the backlog
        self._accepting.cancel()
        self._watching.cancel()
        stats.finish("completed")
        self.done.set()

    async def aclose(self) -> None:
        for io in self.ios:
            await io.aclose()


@asynccontextmanager
async def open_destination(
    accept: Acceptor,
    *,
    channels: int = 2,
    method: str | int | MultiFDMethod = "none",
    method_options: Mapping[str, Any] | None = None,
    registry: MethodRegistry | None = None,
    blocks: Iterable[RAMBlock] | Mapping[str, RAMBlock] | None = None,
    block_factory: BlockFactory = allocate_block,
    uuid: str | bytes | None = None,
    page_size: int = 4096,
    connect_timeout: float = 30.0,
    handshake_timeout: float = 10.0,
    drain_timeout: float = 30.0,
    thread_limit: int | None = None,
    max_device_state: int | None = 64 * 1024 * 1024,
    idle_timeout: float | None = 60.0,
    max_blocks: int = 4096,
    max_total_bytes: int | None = 1 << 40,
) -> AsyncIterator[Destination]:
    """Accept a migration: the main channel and ``channels`` multifd channels, in any order.

    Blocks come from ``blocks`` (names and sizes must match the source's) or are made by
    ``block_factory(name, size, page_size)`` (default: zero-filled anonymous memory). ``uuid``, when
    given, must match every channel's. Leaving the block waits for the migration to complete;
    ``await dst.wait()`` does the same and returns the stats.

    Limits (each breach is a typed error naming it): ``connect_timeout`` for all connections to
    arrive, ``handshake_timeout`` for each connection's first bytes, ``idle_timeout`` for a
    channel that stops moving bytes (ChannelStalled; None: wait forever — the source must not
    pause longer than this between rounds), ``drain_timeout`` for the channels to close at the
    end, ``max_blocks`` and ``max_total_bytes`` for the RAM the source may announce
    (LimitExceeded), ``max_device_state`` for the bytes after the RAM section.
    """
    _check_channels(channels)
    given: dict[str, RAMBlock] | None = None
    if blocks is not None:
        given = dict(blocks) if isinstance(blocks, Mapping) else {b.name: b for b in blocks}
    dst = Destination(
        accept,
        channels=channels,
        method=_resolve_method(method, method_options, registry),
        blocks=given,
        block_factory=block_factory,
        uuid=None if uuid is None else uuid_bytes(uuid),
        page_size=page_size,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        drain_timeout=drain_timeout,
        thread_limit=thread_limit or default_thread_limit(),
        max_device_state=max_device_state,
        idle_timeout=idle_timeout,
        max_blocks=max_blocks,
        max_total_bytes=max_total_bytes,
    )
    for name, value in (
        ("connect_timeout", connect_timeout),
        ("handshake_timeout", handshake_timeout),
        ("drain_timeout", drain_timeout),
        ("idle_timeout", idle_timeout),
    ):
        _check_timeout(name, value)
    try:
        with library_errors(dst.stats):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dst._watch, name="watchdog")
                nursery.start_soon(dst._run, nursery)
                yield dst
    finally:
        await dst.aclose()


async def receive(accept: Acceptor, **options: Any) -> tuple[MigrationStats, dict[str, RAMBlock]]:
    """Receive one whole migration; returns the stats and the blocks by name."""
    async with open_destination(accept, **options) as dst:
        await dst.wait()
    return dst.stats, dst.blocks
