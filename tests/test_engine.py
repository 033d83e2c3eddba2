"""The channel engine end to end: both ends in one trio run, over memory streams and real TCP."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
import trio.testing
from fault_streams import DyingStream, SlowStream

from multifd_core import (
    MemoryNetwork,
    RAMBlock,
    open_destination,
    open_source,
    open_tcp_acceptor,
    tcp_connector,
)
from multifd_core.errors import ChannelClosed, ChannelError, ConfigError, MultiFDError
from multifd_core.image import dirty_some_pages, vm_like_image

TIMEOUT = 60


def make_blocks(sizes: dict[str, int], page_size: int, seed: int = 1) -> list[RAMBlock]:
    return [
        RAMBlock(name, vm_like_image(size, page_size, seed + i), page_size)
        for i, (name, size) in enumerate(sizes.items())
    ]


async def run_migration(
    blocks: list[RAMBlock],
    connect: Callable,
    accept: Callable,
    *,
    channels: int,
    rounds: int = 1,
    dirty_per_round: int = 0,
    seed: int = 7,
    dest_blocks: list[RAMBlock] | None = None,
):
    rng = random.Random(seed)
    result = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                async with open_destination(
                    accept, channels=channels, page_size=blocks[0].page_size, blocks=dest_blocks
                ) as dst:
                    result["stats"] = await dst.wait()
                result["blocks"] = dst.blocks

            nursery.start_soon(destination)
            async with open_source(blocks, connect, channels=channels) as src:
                for r in range(rounds - 1):
                    await src.send_round()
                    for b in blocks:
                        for off in dirty_some_pages(
                            b.memory, b.page_size, dirty_per_round, rng, r + 1
                        ):
                            b.mark_dirty(off)
                result["src"] = await src.complete()
    return result


def assert_same(blocks: list[RAMBlock], received: dict[str, RAMBlock]) -> None:
    assert sorted(received) == sorted(b.name for b in blocks)
    for b in blocks:
        assert received[b.name].host.tobytes() == bytes(b.memory), b.name


@pytest.mark.parametrize("channels", [1, 2, 4, 16])
async def test_memory_streams_channels(channels: int) -> None:
    blocks = make_blocks({"pc.ram": 2 << 20, "pc.bios": 256 << 10}, 4096)
    net = MemoryNetwork()
    res = await run_migration(blocks, net.connect, net.accept, channels=channels)
    assert_same(blocks, res["blocks"])
    src, dst = res["src"], res["stats"]
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
    blocks = make_blocks({"pc.ram": 4 << 20, "vga.vram": 1 << 20, "pc.rom": 128 << 10}, page_size)
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        res = await run_migration(
            blocks,
            tcp_connector("127.0.0.1", acceptor.port),
            acceptor,
            channels=channels,
            rounds=4,
            dirty_per_round=40,
        )
    assert_same(blocks, res["blocks"])
    assert res["stats"].rounds == res["src"].rounds == 4  # both ends count the same rounds


async def test_destination_blocks_given() -> None:
    blocks = make_blocks({"ram": 1 << 20}, 4096)
    target = [RAMBlock("ram", bytearray(b"\xaa" * (1 << 20)))]  # stale contents everywhere
    net = MemoryNetwork()
    res = await run_migration(blocks, net.connect, net.accept, channels=2, dest_blocks=target)
    assert res["blocks"]["ram"] is target[0]
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
    blocks = make_blocks({"ram": 16 << 20}, 4096)
    target = RAMBlock.from_file("ram", tmp_path / "ram.img", 16 << 20, create=True)
    try:
        net = MemoryNetwork()
        res = await run_migration(
            blocks,
            net.connect,
            net.accept,
            channels=2,
            rounds=3,
            dirty_per_round=50,
            dest_blocks=[target],
        )
        assert res["blocks"]["ram"] is target
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
    net = MemoryNetwork()
    accepted = 0

    async def accept():
        nonlocal accepted
        stream = await net.accept()
        accepted += 1
        # connection 2 is multifd channel 0 (main first): make it slow
        return SlowStream(stream, 0.002) if accepted == 2 else stream

    result = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                async with open_destination(accept, channels=4) as dst:
                    await dst.wait()
                result["blocks"] = dst.blocks

            nursery.start_soon(destination)
            async with open_source([block], net.connect, channels=4) as src:
                for r in range(2, 6):
                    await src.send_round()
                    write_round(r)
                    block.mark_all_dirty()
                await src.complete()
    assert result["blocks"]["pc.ram"].host.tobytes() == bytes(mem)


async def test_cancel_source_mid_migration_ends_both_sides(no_leaks: None) -> None:
    blocks = make_blocks({"pc.ram": 8 << 20}, 4096)
    errors: dict[str, BaseException] = {}
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def destination() -> None:
                    try:
                        async with open_destination(acceptor, channels=4) as dst:
                            await dst.wait()
                    except MultiFDError as exc:
                        errors["dst"] = exc

                nursery.start_soon(destination)
                with trio.CancelScope() as cancel:
                    async with open_source(
                        blocks, tcp_connector("127.0.0.1", acceptor.port), channels=4
                    ) as src:
                        await src.send_round()
                        cancel.cancel()
                        await src.complete()
                assert cancel.cancelled_caught
                assert src.stats.status == "cancelled"
    assert isinstance(errors["dst"], ChannelClosed), errors


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_channel_dies_mid_packet(transport: str, no_leaks: None) -> None:
    blocks = make_blocks({"pc.ram": 4 << 20}, 4096)
    errors: dict[str, BaseException] = {}
    acceptor = await open_tcp_acceptor("127.0.0.1", 0)
    net = MemoryNetwork()
    base_connect = (
        net.connect if transport == "memory" else tcp_connector("127.0.0.1", acceptor.port)
    )
    accept = net.accept if transport == "memory" else acceptor
    opened = 0

    async def connect():
        nonlocal opened
        stream = await base_connect()
        opened += 1
        # channel 1 dies in the middle of its first data packet
        return DyingStream(stream, 64 + 1344 + 5000) if opened == 3 else stream

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                try:
                    async with open_destination(accept, channels=3) as dst:
                        await dst.wait()
                except MultiFDError as exc:
                    errors["dst"] = exc

            nursery.start_soon(destination)
            try:
                async with open_source(blocks, connect, channels=3) as src:
                    await src.complete()
            except MultiFDError as exc:
                errors["src"] = exc
    await acceptor.aclose()
    assert isinstance(errors["src"], ChannelError) and errors["src"].channel == 1, errors
    # the destination sees a channel (the dying one, or the main channel the source then
    # closed) end before the migration completed
    assert isinstance(errors["dst"], ChannelClosed), errors


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
    blocks = make_blocks({"pc.ram": 16 << 20}, 4096)
    errors: dict[str, BaseException] = {}
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                cancel = trio.CancelScope()

                async def destination() -> None:
                    with cancel:
                        async with open_destination(acceptor, channels=2) as dst:
                            await dst.wait()
                    errors["dst-status"] = dst.stats.status  # type: ignore[assignment]

                nursery.start_soon(destination)
                try:
                    async with open_source(
                        blocks, tcp_connector("127.0.0.1", acceptor.port), channels=2
                    ) as src:
                        await src.send_round()
                        cancel.cancel()  # the embedding app gives up on the destination
                        for _ in range(20):  # the source keeps going until it notices
                            src.blocks[0].mark_all_dirty()
                            await src.send_round()
                        await src.complete()
                except MultiFDError as exc:
                    errors["src"] = exc
    assert errors["dst-status"] == "cancelled"
    assert isinstance(errors["src"], ChannelClosed), errors


async def test_unix_socket_transport(tmp_path) -> None:
    from multifd_core import open_unix_acceptor, unix_connector

    blocks = make_blocks({"pc.ram": 2 << 20}, 4096)
    path = tmp_path / "mig.sock"
    async with await open_unix_acceptor(path) as acceptor:
        res = await run_migration(
            blocks, unix_connector(path), acceptor, channels=3, rounds=2, dirty_per_round=10
        )
    assert_same(blocks, res["blocks"])


async def test_destination_completes_while_source_context_stays_open() -> None:
    blocks = make_blocks({"pc.ram": 1 << 20}, 4096)
    net = MemoryNetwork()
    done = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                async with open_destination(net.accept, channels=2) as dst:
                    await dst.wait()
                done.set()

            nursery.start_soon(destination)
            async with open_source(blocks, net.connect, channels=2) as src:
                await src.complete()
                await done.wait()  # would hang if the source kept its streams open
