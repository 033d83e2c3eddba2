"""Faults over real TCP: stalls (idle timeout), limits, and cancel-then-retry.

Each test bounds itself with ``trio.fail_after``, expects a typed error on the side that sees the
fault, and checks that no socket is left behind (``no_leaks``).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from fault_streams import DyingStream, Tripwire, counting  # (tests/ is on sys.path: conftest)
from peers import aclose_all, open_channels, sync_packet

from multifd_core import (
    Connector,
    RAMBlock,
    open_destination,
    open_source,
    open_tcp_acceptor,
    tcp_connector,
)
from multifd_core.errors import (
    ChannelError,
    ChannelStalled,
    ConfigError,
    LimitExceeded,
    MigrationTimeout,
)
from multifd_core.testing import (
    LoopbackRun,
    destination_against,
    dirty_blocks,
    image_blocks,
    open_link,
    run_loopback,
)
from multifd_core.transport import BOUNDARY, IDLE, MID, ChannelIO, MemoryNetwork
from multifd_core.watchdog import find_stall
from multifd_core.wire import MultiFDPacket

PS = 4096
BOUND = 20  # seconds: far above every timeout used here; reaching it means a hang


# --- the watchdog's decision, without I/O -------------------------------------------------------


async def test_find_stall_rules() -> None:
    a, b, c = (ChannelIO(trio.testing.memory_stream_pair()[0], cid) for cid in (0, 1, None))
    for io in (a, b, c):
        io.activity = 100.0
    # nothing waits: never a stall, however old the activity
    assert find_stall([a, b, c], 5, 1000.0) is None
    # a channel waiting at a message boundary while another moved bytes recently: fine
    a.waiting = BOUNDARY
    b.activity = 104.0
    assert find_stall([a, b, c], 5, 106.0) is None
    # ... but once nothing moved anywhere for longer than the timeout, it is a stall
    stall = find_stall([a, b, c], 5, 110.0)
    assert isinstance(stall, ChannelStalled) and stall.channel == 0
    assert "no bytes on any channel" in str(stall) and "channel 0" in str(stall)
    # a channel in the middle of a message owes progress even while others move bytes
    a.waiting = IDLE
    c.waiting = MID
    b.activity = 110.0
    stall = find_stall([a, b, c], 5, 110.0)
    assert isinstance(stall, ChannelStalled) and stall.channel is None
    assert str(stall).startswith("main channel: stalled") and "middle of a message" in str(stall)
    c.activity = 106.0
    assert find_stall([a, b, c], 5, 110.0) is None


# --- hand-driven peers over TCP ----------------------------------------------------------------


async def destination_error(
    peer: Callable[[Connector], Awaitable[None]], **options: Any
) -> tuple[BaseException, float]:
    """Run a destination on TCP against ``peer(connect)``; its error and how long it took."""
    async with open_link("tcp") as link:
        run = await destination_against(
            lambda: peer(link.connect), link.accept, timeout=BOUND, **options
        )
    assert run.error is not None, "the destination did not fail"
    return run.error, run.seconds


async def stall_of(peer: Callable[[Connector, list[trio.abc.Stream]], Awaitable[None]]) -> Any:
    """The stall a destination (idle timeout 0.6 s) finds, within 5 s, in ``peer(connect,
    streams)``; the streams the peer keeps in ``streams`` are closed after."""
    streams: list[trio.abc.Stream] = []
    try:
        err, took = await destination_error(lambda c: peer(c, streams), idle_timeout=0.6)
    finally:
        await aclose_all(streams)
    assert isinstance(err, ChannelStalled), repr(err)
    assert took < 5
    return err


async def test_channel_stalls_mid_packet(no_leaks: None) -> None:
    """Channel 1 sends a packet header announcing a page, then nothing (socket left open)."""

    async def peer(connect: Connector, streams: list[trio.abc.Stream]) -> None:
        main, chans = await open_channels(connect, 2)
        streams.extend([main, *chans])
        header = MultiFDPacket(
            flags=0,
            pages_alloc=128,
            normal_pages=1,
            next_packet_size=PS,
            packet_num=0,
            ramblock="pc.ram",
            offsets=[0],
        ).encode(128)
        await chans[1].send_all(header + b"\xaa" * 100)  # 100 of the 4096 payload bytes
        # meanwhile channel 0 keeps moving bytes, as fast as the destination takes them: empty
        # SYNC packets until the destination gives up and closes it
        try:
            for num in range(1, 1 << 31):
                await chans[0].send_all(sync_packet(num))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.sleep_forever()

    err = await stall_of(peer)
    assert err.channel == 1 and "middle of a message" in str(err)


async def test_channel_silent_before_sync(no_leaks: None) -> None:
    """The round ends; channel 0 sends its SYNC, channel 1 never does: all is quiet, a stall."""

    async def peer(connect: Connector, streams: list[trio.abc.Stream]) -> None:
        main, chans = await open_channels(connect, 2, end_round=True)
        streams.extend([main, *chans])
        await chans[0].send_all(sync_packet(0))
        await trio.sleep_forever()

    err = await stall_of(peer)
    assert "no bytes on any channel" in str(err) and "channel 1" in str(err)


async def test_stalled_destination_fails_the_source(no_leaks: None) -> None:
    """A destination that accepts every connection and never reads: the source's sends stop
    making progress once the socket buffers are full, and its watchdog ends the migration."""
    held: list[trio.SocketStream] = []
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:

        async def black_hole() -> None:
            while True:
                held.append(await acceptor())  # type: ignore[arg-type]

        start = trio.current_time()
        try:
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(black_hole)
                    with pytest.raises(ChannelStalled) as info:
                        async with open_source(
                            image_blocks(32 << 20, PS),
                            tcp_connector("127.0.0.1", acceptor.port),
                            channels=2,
                            idle_timeout=0.6,
                        ) as src:
                            await src.complete()
                    nursery.cancel_scope.cancel()
        finally:
            for s in held:
                await s.aclose()
        took = trio.current_time() - start
    assert "stalled" in str(info.value) and "middle of a message" in str(info.value)
    assert src.stats.status == "failed"
    assert took < 8


async def test_source_connect_timeout() -> None:
    async def never() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(BOUND), pytest.raises(MigrationTimeout, match="main channel within"):
        async with open_source(image_blocks(1 << 20), never, connect_timeout=0.3):
            pass


async def test_bad_timeouts_are_refused() -> None:
    with pytest.raises(ConfigError, match="idle_timeout"):
        async with open_source(image_blocks(1 << 20), MemoryNetwork().connect, idle_timeout=0):
            pass
    with pytest.raises(ConfigError, match="handshake_timeout"):
        async with open_destination(MemoryNetwork().accept, handshake_timeout=-1):
            pass


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_total_bytes": 8 << 20}, "more than the 8388608 allowed"),
        ({"max_blocks": 1}, "more than 1 RAM blocks"),
    ],
)
async def test_destination_limits(options: dict[str, int], message: str, no_leaks: None) -> None:
    run = await run_loopback(
        image_blocks({"pc.ram": 8 << 20, "vga.vram": 1 << 20}, PS),
        transport="tcp",
        source={"idle_timeout": 2},
        destination=options,
        capture_errors=True,
        timeout=BOUND,
    )
    errors = (run.dst_error, run.src_error)
    assert isinstance(run.dst_error, LimitExceeded), errors
    assert message in str(run.dst_error)
    assert isinstance(run.src_error, ChannelError | MigrationTimeout), errors


async def test_block_that_cannot_be_allocated() -> None:
    def factory(name: str, size: int, page_size: int) -> RAMBlock:
        raise MemoryError("no room")

    async def peer(connect: Connector) -> None:
        main, chans = await open_channels(connect, 2)
        try:
            await trio.sleep_forever()
        finally:
            await aclose_all([main, *chans])

    err, _ = await destination_error(peer, block_factory=factory)
    assert isinstance(err, LimitExceeded) and "cannot allocate block 'pc.ram'" in str(err)


# --- cancellation from the embedding program, then a retry -------------------------------------

CANCEL_POINTS = ["after-connect", "mid-round", "after-round", "mid-complete"]
OPTIONS = {"channels": 3, "idle_timeout": 5}


async def cancelled_migration(
    blocks: list[RAMBlock], side: str, point: str, rng: random.Random
) -> LoopbackRun:
    """A migration whose ``side`` is cancelled at ``point``: right after the source connected,
    after 512 KiB of the first round on channel 0, after the round, or after 256 KiB of the
    last round (2000 pages dirtied meanwhile) on channel 0. A cancelled destination has ended
    before the source goes on from the points between calls."""
    wire = Tripwire()

    def cancel(run: LoopbackRun) -> None:
        (run.cancel_source if side == "source" else run.cancel_destination)()

    async def cancel_between_calls(run: LoopbackRun) -> None:
        cancel(run)
        if side == "destination":
            await run.dst.done.wait()

    async def on_open(_: int, run: LoopbackRun) -> None:
        if point == "after-connect":
            await cancel_between_calls(run)
        if point == "mid-round":
            wire.arm(512 << 10, lambda: cancel(run))

    async def between_rounds(_: int, run: LoopbackRun) -> None:
        if point == "after-round":
            await cancel_between_calls(run)
        if point == "mid-complete":
            wire.arm(256 << 10, lambda: cancel(run))
            dirty_blocks(blocks, 2000, rng, 1)

    return await run_loopback(
        blocks,
        transport="tcp",
        rounds=2,
        on_open=on_open,
        between_rounds=between_rounds,
        # channel 0 (the second connection) counts the bytes; the rest keep their sockets bare
        wrap_connect=counting(lambda n, stream: wire.watch(stream) if n == 2 else stream),
        source=OPTIONS,
        destination=OPTIONS,
        capture_errors=True,
        timeout=BOUND,
    )


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize("point", CANCEL_POINTS)
async def test_cancel_then_retry_to_fresh_destination(
    side: str, point: str, no_leaks: None
) -> None:
    """Cancel one end at ``point`` with a trio cancel scope; both ends stop; then the same source
    blocks (dirtied meanwhile) migrate completely to a fresh destination (QEMU's cancel test)."""
    rng = random.Random(point)
    blocks = image_blocks(16 << 20, PS, seed=3)
    with trio.fail_after(BOUND * 2):
        first = await cancelled_migration(blocks, side, point, rng)
        # the cancelled side reports "cancelled"; the other a typed error (or, when the cancel
        # came too late to matter, a completed migration: then nothing is left to assert)
        if side == "source" and first.src_cancelled:
            assert first.source is not None and first.source.stats.status == "cancelled"
            assert isinstance(first.dst_error, ChannelError | MigrationTimeout), first.dst_error
        if side == "destination":
            # cancelled: neither completed nor failed; the source fails with a typed error when
            # it still writes after the close, or believes it completed when everything fit in
            # the socket buffers (precopy has no return path, as in QEMU)
            assert first.dst_error is None, first.dst_error
            if first.dst_stats is None and first.src_error is not None:
                assert isinstance(first.src_error, ChannelError | MigrationTimeout)
        # 2: the same blocks, dirtied again, to a fresh destination (either end's error raised)
        dirty_blocks(blocks, 500, rng, 2)
        second = await run_loopback(
            blocks,
            transport="tcp",
            rounds=2,
            between_rounds=lambda r, _: dirty_blocks(blocks, 500, rng, 3),
            source=OPTIONS,
            destination=OPTIONS,
        )
        assert second.src_stats is not None and second.src_stats.status == "completed"
        assert second.dst_blocks["pc.ram"].host.tobytes() == bytes(blocks[0].memory)


# --- the main channel closing early ------------------------------------------------------------


async def test_main_channel_closes_early_hand_peer(no_leaks: None) -> None:
    async def peer(connect: Connector) -> None:
        main, chans = await open_channels(connect, 2)
        await main.aclose()  # setup sent, then gone: no round end, no EOF
        try:
            await trio.sleep_forever()
        finally:
            await aclose_all(chans)

    err, took = await destination_error(peer, idle_timeout=10)
    assert isinstance(err, ChannelError) and err.channel is None, repr(err)
    assert "closed early" in str(err) and str(err).startswith("main channel")
    assert took < 5


@pytest.mark.parametrize("limit", [30, 5000])
async def test_main_channel_cut_under_a_real_source(limit: int, no_leaks: None) -> None:
    """The source's main channel dies after ``limit`` bytes (in the header / in the zero records
    of the first round): both ends end with typed errors, promptly, leaving no socket."""
    run = await run_loopback(
        image_blocks(8 << 20, PS),
        transport="tcp",
        wrap_connect=counting(lambda n, stream: DyingStream(stream, limit) if n == 1 else stream),
        source={"idle_timeout": 3},
        destination={"idle_timeout": 3},
        capture_errors=True,
        timeout=BOUND,
    )
    took = max(run.src_seconds, run.dst.seconds)
    errors = (run.src_error, run.dst_error)
    assert isinstance(run.src_error, ChannelError) and run.src_error.channel is None, errors
    dst = run.dst_error
    assert isinstance(dst, ChannelError) and dst.channel is None, errors
    assert "closed early: main stream truncated" in str(dst)
    assert took < 2.5  # found from the closed socket, not by the 3 s idle timeout
