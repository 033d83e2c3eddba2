"""The channel engine end to end: both ends in one trio run, over memory streams and real TCP."""

from __future__ import annotations

import random

import pytest
import trio
from fault_streams import DyingStream, SlowStream, counting

from multifd_core import MemoryNetwork, RAMBlock, open_source
from multifd_core.errors import ChannelClosed, ChannelError, ConfigError
from multifd_core.options import DEFAULT_PACKET_SIZE
from multifd_core.testing import (
    DestinationRun,
    Link,
    LoopbackRun,
    dirty_blocks,
    image_blocks,
    open_link,
    run_destination,
    run_loopback,
)
from multifd_core.wire import MULTIFD_PACKET_SIZE

TIMEOUT = 60


async def run_migration(
    blocks: list[RAMBlock],
    transport: str | Link = "memory",
    *,
    channels: int,
    rounds: int = 1,
    dirty_per_round: int = 0,
    seed: int = 7,
    dest_blocks: list[RAMBlock] | None = None,
    packet_size: int = DEFAULT_PACKET_SIZE,
) -> LoopbackRun:
    """Migrate ``blocks`` in ``rounds`` rounds, ``dirty_per_round`` pages of each block
    changing between rounds; raises either end's error."""
    rng = random.Random(seed)
    return await run_loopback(
        blocks,
        transport=transport,
        rounds=rounds,
        between_rounds=lambda r, _: dirty_blocks(blocks, dirty_per_round, rng, r),
        source={"channels": channels, "packet_size": packet_size},
        destination={
            "channels": channels,
            "page_size": blocks[0].page_size,
            "blocks": dest_blocks,
        },
        timeout=TIMEOUT,
    )


def assert_same(blocks: list[RAMBlock], received: dict[str, RAMBlock]) -> None:
    assert sorted(received) == sorted(b.name for b in blocks)
    for b in blocks:
        assert received[b.name].host.tobytes() == bytes(b.memory), b.name


@pytest.mark.parametrize("channels", [1, 2, 4, 16])
async def test_memory_streams_channels(channels: int) -> None:
    blocks = image_blocks({"pc.ram": 2 << 20, "pc.bios": 256 << 10}, 4096)
    res = await run_migration(blocks, channels=channels)
    assert_same(blocks, res.dst_blocks)
    src, dst = res.src_stats, res.dst_stats
    assert src is not None and dst is not None
    assert src.status == dst.status == "completed"
    assert src.normal_pages == dst.normal_pages > 0
    assert src.zero_pages == dst.zero_pages > 0
    assert src.normal_pages + src.zero_pages == sum(b.npages for b in blocks)
    assert len(dst.per_channel) == channels
    # every channel sent at least its SYNCs: setup round + final round
    assert all(c.sync_packets == 2 for c in dst.per_channel)


@pytest.mark.parametrize("page_size", [4096, 65536])
@pytest.mark.parametrize("channels", [2, 4])
async def test_rounds_with_changing_pages_tcp(page_size: int, channels: int) -> None:
    blocks = image_blocks({"pc.ram": 4 << 20, "vga.vram": 1 << 20, "pc.rom": 128 << 10}, page_size)
    res = await run_migration(blocks, "tcp", channels=channels, rounds=4, dirty_per_round=40)
    assert_same(blocks, res.dst_blocks)
    assert res.dst_stats and res.src_stats
    assert res.dst_stats.rounds == res.src_stats.rounds == 4  # both ends count the same rounds


async def test_destination_blocks_given() -> None:
    blocks = image_blocks({"ram": 1 << 20}, 4096)
    target = [RAMBlock("ram", bytearray(b"\xaa" * (1 << 20)))]  # stale contents everywhere
    res = await run_migration(blocks, channels=2, dest_blocks=target)
    assert res.dst_blocks["ram"] is target[0]
    assert bytes(target[0].memory) == bytes(blocks[0].memory)  # zero pages were zeroed too


@pytest.mark.parametrize("limit", [None, 0.0])
async def test_file_blocks_written_inline_until_a_write_is_slow(
    tmp_path, monkeypatch, limit: float | None
) -> None:
    """Pages bound for a file are written on the event loop while writes are quick; once
    INLINE_SLOW_WRITES (3) writes in a row took longer than INLINE_WRITE_LIMIT (0 here: every
    write), the channel's later writes go to a worker thread. Either way every page lands, over
    3 rounds."""
    import threading

    from multifd_core import landing

    if limit is not None:
        monkeypatch.setattr(landing, "INLINE_WRITE_LIMIT", limit)
    writers: list[bool] = []  # True: written on the trio thread
    real = landing.write_spans

    def spy(block: RAMBlock, spans, views) -> None:
        writers.append(threading.current_thread() is threading.main_thread())
        real(block, spans, views)

    monkeypatch.setattr(landing, "write_spans", spy)
    blocks = image_blocks({"ram": 16 << 20}, 4096)
    target = RAMBlock.from_file("ram", tmp_path / "ram.img", 16 << 20, create=True)
    try:
        res = await run_migration(  # QEMU's packets: enough of them to see the switch
            blocks,
            channels=2,
            rounds=3,
            dirty_per_round=50,
            dest_blocks=[target],
            packet_size=MULTIFD_PACKET_SIZE,
        )
        assert res.dst_blocks["ram"] is target
    finally:
        target.close()
    assert (tmp_path / "ram.img").read_bytes() == bytes(blocks[0].memory)
    assert len(writers) > 12
    if limit is None:
        assert all(writers)
    else:  # each channel's first 3 writes are inline, then its writes move off the loop
        assert writers.count(True) <= 2 * landing.INLINE_SLOW_WRITES


async def test_sync_barrier_orders_rounds_with_uneven_channels() -> None:
    """Every page changes every round; one channel is much slower to read than the others.

    Without the SYNC barrier, a fast channel writes a page of round k+1 before the slow one writes
    the same page of round k, and the destination ends with stale pages.
    """
    page_size = 4096
    npages = 512
    mem = bytearray(npages * page_size)
    block = RAMBlock("pc.ram", mem, page_size)

    def write_round(r: int) -> None:
        for i in range(npages):
            mem[i * page_size : i * page_size + 16] = r.to_bytes(8, "little") + (i + 1).to_bytes(
                8, "little"
            )

    write_round(1)

    def next_round(r: int, _: LoopbackRun) -> None:
        write_round(r + 1)
        block.mark_all_dirty()

    res = await run_loopback(
        [block],
        rounds=5,
        between_rounds=next_round,
        # connection 2 is multifd channel 0 (main first): make it slow
        wrap_accept=counting(lambda n, stream: SlowStream(stream, 0.002) if n == 2 else stream),
        source={"channels": 4},
        destination={"channels": 4},
        timeout=TIMEOUT,
    )
    assert res.dst_blocks["pc.ram"].host.tobytes() == bytes(mem)


async def test_cancel_source_mid_migration_ends_both_sides(no_leaks: None) -> None:
    res = await run_loopback(
        image_blocks({"pc.ram": 8 << 20}, 4096),
        transport="tcp",
        rounds=2,
        between_rounds=lambda r, run: run.cancel_source(),  # then complete() is cancelled
        source={"channels": 4},
        destination={"channels": 4},
        capture_errors=True,
        timeout=TIMEOUT,
    )
    assert res.src_cancelled
    assert res.source is not None and res.source.stats.status == "cancelled"
    assert isinstance(res.dst_error, ChannelClosed), res.dst_error


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_channel_dies_mid_packet(transport: str, no_leaks: None) -> None:
    res = await run_loopback(
        image_blocks({"pc.ram": 4 << 20}, 4096),
        transport=transport,
        # channel 1 (the third connection) dies in the middle of its first data packet
        wrap_connect=counting(lambda n, s: DyingStream(s, 64 + 1344 + 5000) if n == 3 else s),
        source={"channels": 3},
        destination={"channels": 3},
        capture_errors=True,
        timeout=10,
    )
    errors = (res.src_error, res.dst_error)
    assert isinstance(res.src_error, ChannelError) and res.src_error.channel == 1, errors
    # the destination sees a channel (the dying one, or the main channel the source then
    # closed) end before the migration completed
    assert isinstance(res.dst_error, ChannelClosed), errors


async def test_bad_config_is_refused() -> None:
    net = MemoryNetwork()
    with pytest.raises(ConfigError):
        async with open_source([], net.connect):
            pass
    with pytest.raises(ConfigError):
        async with open_source([RAMBlock("a", bytearray(4096))], net.connect, channels=0):
            pass
    blocks = [RAMBlock("a", bytearray(4096)), RAMBlock("a", bytearray(4096))]
    with pytest.raises(ConfigError, match="duplicate"):
        async with open_source(blocks, net.connect):
            pass


async def test_cancel_destination_mid_migration_ends_both_sides(no_leaks: None) -> None:
    blocks = image_blocks({"pc.ram": 16 << 20}, 4096)

    def between_rounds(r: int, run: LoopbackRun) -> None:
        if r == 1:
            run.cancel_destination()  # the embedding app gives up on the destination
        if r <= 20:  # the source keeps going (20 more rounds) until it notices
            blocks[0].mark_all_dirty()

    res = await run_loopback(
        blocks,
        transport="tcp",
        rounds=22,
        between_rounds=between_rounds,
        source={"channels": 2},
        destination={"channels": 2},
        capture_errors=True,
        timeout=TIMEOUT,
    )
    assert res.dst.status == "cancelled"
    assert isinstance(res.src_error, ChannelClosed), res.src_error


async def test_unix_socket_transport(tmp_path) -> None:
    blocks = image_blocks({"pc.ram": 2 << 20}, 4096)
    async with open_link("unix", path=tmp_path / "mig.sock") as link:
        res = await run_migration(blocks, link, channels=3, rounds=2, dirty_per_round=10)
    assert_same(blocks, res.dst_blocks)


async def test_destination_completes_while_source_context_stays_open() -> None:
    blocks = image_blocks({"pc.ram": 1 << 20}, 4096)
    net = MemoryNetwork()
    dst = DestinationRun()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_destination(net.accept, dst, channels=2))
            async with open_source(blocks, net.connect, channels=2) as src:
                await src.complete()
                await dst.done.wait()  # would hang if the source kept its streams open
    assert dst.error is None and dst.stats is not None
