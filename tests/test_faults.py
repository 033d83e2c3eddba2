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
from fault_streams import DyingStream  # (tests/ is on sys.path: conftest)

from multifd_core import RAMBlock, open_destination, open_source, open_tcp_acceptor, tcp_connector
from multifd_core.errors import (
    ChannelError,
    ChannelStalled,
    ConfigError,
    LimitExceeded,
    MigrationTimeout,
    MultiFDError,
)
from multifd_core.image import dirty_some_pages, vm_like_image
from multifd_core.mainstream import MainStreamWriter
from multifd_core.transport import BOUNDARY, IDLE, MID, Acceptor, ChannelIO, MemoryNetwork
from multifd_core.watchdog import find_stall
from multifd_core.wire import MULTIFD_FLAG_SYNC, MultiFDInit, MultiFDPacket

PS = 4096
BOUND = 20  # seconds: far above every timeout used here; reaching it means a hang


def image_blocks(size: int = 4 << 20, seed: int = 1) -> list[RAMBlock]:
    return [RAMBlock("pc.ram", vm_like_image(size, PS, seed), PS)]


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


def main_setup(blocks: list[tuple[str, int]], end_round: bool = False) -> bytes:
    w = MainStreamWriter()
    w.header()
    w.ram_setup(blocks)
    if end_round:
        w.eos()  # the setup round ends: the destination waits for every channel's SYNC
    return w.take()


async def destination_error(
    peer: Callable[[int], Awaitable[None]], **options: Any
) -> tuple[BaseException, float]:
    """Run a destination on TCP against ``peer(port)``; its error and how long it took."""
    options.setdefault("channels", 2)
    caught: list[BaseException] = []
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        start = trio.current_time()
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer, acceptor.port)
                try:
                    async with open_destination(acceptor, **options) as dst:
                        await dst.wait()
                except MultiFDError as exc:
                    caught.append(exc)
                nursery.cancel_scope.cancel()
        took = trio.current_time() - start
    assert caught, "the destination did not fail"
    return caught[0], took


async def open_channels(
    port: int, n: int, end_round: bool = False
) -> tuple[trio.SocketStream, list[trio.SocketStream]]:
    main = await trio.open_tcp_stream("127.0.0.1", port)
    await main.send_all(main_setup([("pc.ram", 1 << 20)], end_round))
    chans = []
    for cid in range(n):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(MultiFDInit(cid, bytes(16)).encode())
        chans.append(s)
    return main, chans


async def test_channel_stalls_mid_packet(no_leaks: None) -> None:
    """Channel 1 sends a packet header announcing a page, then nothing (socket left open)."""
    streams: list[trio.SocketStream] = []

    async def peer(port: int) -> None:
        main, chans = await open_channels(port, 2)
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
        # meanwhile channel 0 keeps moving bytes: an empty SYNC packet now and then
        for num in range(1, 1000):
            sync = MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, num, "", []).encode(128)
            await chans[0].send_all(sync)
            await trio.sleep(0.1)

    try:
        err, took = await destination_error(peer, idle_timeout=0.6)
    finally:
        for s in streams:
            await s.aclose()
    assert isinstance(err, ChannelStalled), repr(err)
    assert err.channel == 1 and "middle of a message" in str(err)
    assert took < 5


async def test_channel_silent_before_sync(no_leaks: None) -> None:
    """The round ends; channel 0 sends its SYNC, channel 1 never does: all is quiet, a stall."""
    streams: list[trio.SocketStream] = []

    async def peer(port: int) -> None:
        main, chans = await open_channels(port, 2, end_round=True)
        streams.extend([main, *chans])
        sync = MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, 0, "", []).encode(128)
        await chans[0].send_all(sync)
        await trio.sleep_forever()

    try:
        err, took = await destination_error(peer, idle_timeout=0.6)
    finally:
        for s in streams:
            await s.aclose()
    assert isinstance(err, ChannelStalled), repr(err)
    assert "no bytes on any channel" in str(err) and "channel 1" in str(err)
    assert took < 5


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
                            image_blocks(32 << 20),
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
    blocks = [
        RAMBlock("pc.ram", vm_like_image(8 << 20, PS, 1), PS),
        RAMBlock("vga.vram", vm_like_image(1 << 20, PS, 2), PS),
    ]
    errors: dict[str, BaseException] = {}
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:

                async def destination() -> None:
                    try:
                        async with open_destination(acceptor, **options) as dst:  # type: ignore[arg-type]
                            await dst.wait()
                    except MultiFDError as exc:
                        errors["dst"] = exc

                nursery.start_soon(destination)
                try:
                    async with open_source(
                        blocks, tcp_connector("127.0.0.1", acceptor.port), idle_timeout=2
                    ) as src:
                        await src.complete()
                except MultiFDError as exc:
                    errors["src"] = exc
    assert isinstance(errors["dst"], LimitExceeded), errors
    assert message in str(errors["dst"])
    assert isinstance(errors["src"], ChannelError | MigrationTimeout), errors


async def test_block_that_cannot_be_allocated() -> None:
    def factory(name: str, size: int, page_size: int) -> RAMBlock:
        raise MemoryError("no room")

    async def peer(port: int) -> None:
        main, chans = await open_channels(port, 2)
        try:
            await trio.sleep_forever()
        finally:
            for s in (main, *chans):
                await s.aclose()

    err, _ = await destination_error(peer, block_factory=factory)
    assert isinstance(err, LimitExceeded) and "cannot allocate block 'pc.ram'" in str(err)


# --- cancellation from the embedding program, then a retry -------------------------------------


async def _destination_task(acceptor: Acceptor, out: dict[str, Any], **options: Any) -> None:
    try:
        async with open_destination(acceptor, channels=3, idle_timeout=5, **options) as dst:
            out["stats"] = await dst.wait()
        out["blocks"] = dst.blocks
    except MultiFDError as exc:
        out["error"] = exc


CANCEL_POINTS = ["after-connect", "mid-round", "after-round", "mid-complete"]


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize("point", CANCEL_POINTS)
async def test_cancel_then_retry_to_fresh_destination(
    side: str, point: str, no_leaks: None
) -> None:
    """Cancel one end at ``point`` with a trio cancel scope; both ends stop; then the same source
    blocks (dirtied meanwhile) migrate completely to a fresh destination (QEMU's cancel test)."""
    rng = random.Random(point)
    blocks = image_blocks(16 << 20, seed=3)
    connect_opts = {"channels": 3, "idle_timeout": 5}
    with trio.fail_after(BOUND * 2):
        # 1: the cancelled migration
        first: dict[str, Any] = {}
        async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
            async with trio.open_nursery() as nursery:
                cancel = trio.CancelScope()

                async def destination() -> None:
                    if side == "destination":
                        with cancel:
                            await _destination_task(acceptor, first)
                    else:
                        await _destination_task(acceptor, first)

                nursery.start_soon(destination)
                src_error: BaseException | None = None
                with trio.CancelScope() as src_scope:
                    if side == "source":
                        cancel = src_scope
                    try:
                        async with open_source(
                            blocks, tcp_connector("127.0.0.1", acceptor.port), **connect_opts
                        ) as src:
                            if point == "after-connect":
                                cancel.cancel()
                                await trio.sleep(0.2)
                            if point == "mid-round":
                                nursery.start_soon(_cancel_later, cancel, 0.01)
                            await src.send_round()
                            if point == "after-round":
                                cancel.cancel()
                                await trio.sleep(0.2)
                            if point == "mid-complete":
                                nursery.start_soon(_cancel_later, cancel, 0.005)
                                for off in dirty_some_pages(blocks[0].memory, PS, 2000, rng, 1):
                                    blocks[0].mark_dirty(off)
                            await src.complete()
                    except MultiFDError as exc:
                        src_error = exc
                if side == "destination":
                    nursery.cancel_scope.cancel()
        # the cancelled side reports "cancelled"; the other a typed error (or, when the cancel
        # came too late to matter, a completed migration: then nothing is left to assert)
        if side == "source" and src_scope.cancelled_caught:
            assert src.stats.status == "cancelled"
            assert isinstance(first.get("error"), ChannelError | MigrationTimeout), first
        if side == "destination":
            # cancelled: neither completed nor failed; the source fails with a typed error when
            # it still writes after the close, or believes it completed when everything fit in
            # the socket buffers (precopy has no return path, as in QEMU)
            assert "error" not in first, first
            if "stats" not in first and src_error is not None:
                assert isinstance(src_error, ChannelError | MigrationTimeout), src_error
        # 2: the same blocks, dirtied again, to a fresh destination
        for off in dirty_some_pages(blocks[0].memory, PS, 500, rng, 2):
            blocks[0].mark_dirty(off)
        second: dict[str, Any] = {}
        async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_destination_task, acceptor, second)
                async with open_source(
                    blocks, tcp_connector("127.0.0.1", acceptor.port), **connect_opts
                ) as src:
                    await src.send_round()
                    for off in dirty_some_pages(blocks[0].memory, PS, 500, rng, 3):
                        blocks[0].mark_dirty(off)
                    stats = await src.complete()
        assert "error" not in second, second
        assert stats.status == "completed"
        assert second["blocks"]["pc.ram"].host.tobytes() == bytes(blocks[0].memory)


async def _cancel_later(scope: trio.CancelScope, delay: float) -> None:
    await trio.sleep(delay)
    scope.cancel()


# --- the main channel closing early ------------------------------------------------------------


async def test_main_channel_closes_early_hand_peer(no_leaks: None) -> None:
    async def peer(port: int) -> None:
        main, chans = await open_channels(port, 2)
        await main.aclose()  # setup sent, then gone: no round end, no EOF
        try:
            await trio.sleep_forever()
        finally:
            for s in chans:
                await s.aclose()

    err, took = await destination_error(peer, idle_timeout=10)
    assert isinstance(err, ChannelError) and err.channel is None, repr(err)
    assert "closed early" in str(err) and str(err).startswith("main channel")
    assert took < 5


@pytest.mark.parametrize("limit", [30, 5000])
async def test_main_channel_cut_under_a_real_source(limit: int, no_leaks: None) -> None:
    """The source's main channel dies after ``limit`` bytes (in the header / in the zero records
    of the first round): both ends end with typed errors, promptly, leaving no socket."""
    errors: dict[str, BaseException] = {}
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        made = 0

        async def connect() -> trio.abc.Stream:
            nonlocal made
            made += 1
            stream = await trio.open_tcp_stream("127.0.0.1", acceptor.port)
            return DyingStream(stream, limit) if made == 1 else stream

        start = trio.current_time()
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:

                async def destination() -> None:
                    try:
                        async with open_destination(acceptor, idle_timeout=3) as dst:
                            await dst.wait()
                    except MultiFDError as exc:
                        errors["dst"] = exc

                nursery.start_soon(destination)
                try:
                    async with open_source(image_blocks(8 << 20), connect, idle_timeout=3) as src:
                        await src.complete()
                except MultiFDError as exc:
                    errors["src"] = exc
        took = trio.current_time() - start
    assert isinstance(errors.get("src"), ChannelError) and errors["src"].channel is None, errors
    dst = errors.get("dst")
    assert isinstance(dst, ChannelError) and dst.channel is None, errors
    assert "closed early: main stream truncated" in str(dst)
    assert took < 2.5  # found from the closed socket, not by the 3 s idle timeout
