"""The destination facing bad peers: wrong handshakes, hostile packets, silent connections.

A hand-driven source writes the main stream and the channels byte by byte, so that each test
breaks exactly one rule; the destination must end with the typed error naming it, never write
outside its blocks, and leave no socket behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from multifd_core import (
    MemoryNetwork,
    MultiFDMethod,
    RAMBlock,
    load_methods,
    open_destination,
    open_source,
)
from multifd_core.errors import (
    BadChannelId,
    BadMagic,
    BadOffset,
    BlockMismatch,
    ChannelClosed,
    CompressionMismatch,
    DuplicateChannel,
    MainStreamError,
    MigrationTimeout,
    MultiFDError,
    UnknownBlock,
    UuidMismatch,
)
from multifd_core.mainstream import MainStreamWriter
from multifd_core.methods import RecvContext, SendContext
from multifd_core.nocomp import NocompRecv, NocompSend
from multifd_core.wire import MULTIFD_FLAG_SYNC, MultiFDInit, MultiFDPacket

PS = 4096
UUID_A = bytes(range(16))
UUID_B = bytes(range(1, 17))


async def expect_destination_error(
    net: MemoryNetwork, peer, error: type[BaseException], **options
) -> BaseException:
    """Run a destination against ``peer(net)``; return the error it ended with."""
    options.setdefault("channels", 2)
    caught: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer, net)
            try:
                async with open_destination(net.accept, **options) as dst:
                    await dst.wait()
            except MultiFDError as exc:
                caught.append(exc)
            nursery.cancel_scope.cancel()
    assert caught, "the destination did not fail"
    assert isinstance(caught[0], error), repr(caught[0])
    return caught[0]


def main_setup(blocks: Sequence[tuple[str, int]]) -> bytes:
    w = MainStreamWriter()
    w.header()
    w.ram_setup(blocks)
    return w.take()


async def connect_channel(net: MemoryNetwork, cid: int, uuid: bytes = bytes(16)):
    stream = await net.connect()
    await stream.send_all(MultiFDInit(cid, uuid).encode())
    return stream


async def test_uuid_mismatch() -> None:
    async def peer(net: MemoryNetwork) -> None:
        main = await net.connect()
        await main.send_all(main_setup([("ram", 1 << 20)]))
        await connect_channel(net, 0, UUID_B)
        await trio.sleep_forever()

    err = await expect_destination_error(MemoryNetwork(), peer, UuidMismatch, uuid=UUID_A)
    assert "does not match" in str(err)


async def test_uuid_mismatch_between_real_ends() -> None:
    """Our own source with another uuid: the destination refuses, both ends stop."""
    net = MemoryNetwork()
    block = RAMBlock("ram", bytearray(1 << 20))
    errors: dict[str, BaseException] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                try:
                    async with open_destination(net.accept, channels=2, uuid=UUID_A) as dst:
                        await dst.wait()
                except MultiFDError as exc:
                    errors["dst"] = exc
                    # closing our ends makes the source fail too
                    for s in net.opened:
                        await s.aclose()

            nursery.start_soon(destination)
            try:
                async with open_source([block], net.connect, channels=2, uuid=UUID_B) as src:
                    await src.complete()
            except MultiFDError as exc:
                errors["src"] = exc
    assert isinstance(errors["dst"], UuidMismatch)
    assert isinstance(errors["src"], ChannelClosed)


async def test_channel_id_out_of_range() -> None:
    async def peer(net: MemoryNetwork) -> None:
        await connect_channel(net, 2)  # channels 0..1 only
        await trio.sleep_forever()

    err = await expect_destination_error(MemoryNetwork(), peer, BadChannelId)
    assert "channel id 2" in str(err)


async def test_duplicate_channel_id() -> None:
    async def peer(net: MemoryNetwork) -> None:
        await connect_channel(net, 1)
        await connect_channel(net, 1)
        await trio.sleep_forever()

    await expect_destination_error(MemoryNetwork(), peer, DuplicateChannel)


async def test_garbage_connection() -> None:
    async def peer(net: MemoryNetwork) -> None:
        s = await net.connect()
        await s.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await trio.sleep_forever()

    err = await expect_destination_error(MemoryNetwork(), peer, BadMagic)
    assert "47455420" in str(err)  # "GET " in hex


async def test_second_main_channel() -> None:
    async def peer(net: MemoryNetwork) -> None:
        for _ in range(2):
            s = await net.connect()
            await s.send_all(main_setup([("ram", 1 << 20)]))
        await trio.sleep_forever()

    await expect_destination_error(MemoryNetwork(), peer, MainStreamError)


async def test_silent_connection_times_out() -> None:
    async def peer(net: MemoryNetwork) -> None:
        await net.connect()  # never says anything
        await trio.sleep_forever()

    await expect_destination_error(MemoryNetwork(), peer, MigrationTimeout, handshake_timeout=0.3)


async def test_missing_channels_time_out() -> None:
    async def peer(net: MemoryNetwork) -> None:
        main = await net.connect()
        await main.send_all(main_setup([("ram", 1 << 20)]))
        await connect_channel(net, 0)  # channel 1 never comes
        await trio.sleep_forever()

    err = await expect_destination_error(
        MemoryNetwork(), peer, MigrationTimeout, connect_timeout=0.3
    )
    assert "2 of 3" in str(err)


async def test_block_mismatch_with_given_blocks() -> None:
    async def peer(net: MemoryNetwork) -> None:
        main = await net.connect()
        await main.send_all(main_setup([("ram", 2 << 20)]))
        await trio.sleep_forever()

    err = await expect_destination_error(
        MemoryNetwork(), peer, BlockMismatch, blocks=[RAMBlock("ram", bytearray(1 << 20))]
    )
    assert "2097152" in str(err)


def guarded_block(name: str, size: int, guard: int = 1 << 16) -> tuple[RAMBlock, bytearray]:
    """A block that is the middle of a larger buffer whose edges must stay untouched."""
    backing = bytearray(b"\x5a" * (size + 2 * guard))
    block = RAMBlock(name, memoryview(backing)[guard : guard + size], PS)
    return block, backing


def guards_intact(backing: bytearray, size: int, guard: int = 1 << 16) -> bool:
    return backing[:guard] == b"\x5a" * guard and backing[guard + size :] == b"\x5a" * guard


async def hostile_packet_peer(net: MemoryNetwork, packet: bytes, payload: bytes) -> None:
    """A source that sets up, syncs once, then sends one given packet on channel 0."""
    main = await net.connect()
    w = MainStreamWriter()
    w.header()
    w.ram_setup([("ram", 1 << 20)])
    chans = [await connect_channel(net, i) for i in range(2)]
    await main.send_all(w.take())
    for i, ch in enumerate(chans):
        sync = MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, i).encode(128)
        await ch.send_all(sync)
    w.eos()
    w.section_end()
    await main.send_all(w.take())
    await chans[0].send_all(packet + payload)
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("offsets", "error"),
    [
        ([1 << 20], BadOffset),  # one page past the end
        ([(1 << 20) - PS, 1 << 40], BadOffset),  # far away
        ([0x800], BadOffset),  # unaligned
    ],
)
async def test_hostile_offsets_never_write_outside(offsets: list[int], error: type) -> None:
    size = 1 << 20
    block, backing = guarded_block("ram", size)
    n = len(offsets)
    packet = MultiFDPacket(0, 128, n, n * PS, 99, "ram", offsets).encode(128)
    err = await expect_destination_error(
        MemoryNetwork(),
        lambda net: hostile_packet_peer(net, packet, b"\xee" * (n * PS)),
        error,
        blocks=[block],
    )
    assert err.channel == 0 and err.packet_num == 99
    assert guards_intact(backing, size)
    assert b"\xee" not in backing


async def test_unknown_block_in_packet() -> None:
    packet = MultiFDPacket(0, 128, 1, PS, 5, "pc.rom", [0]).encode(128)
    err = await expect_destination_error(
        MemoryNetwork(), lambda net: hostile_packet_peer(net, packet, bytes(PS)), UnknownBlock
    )
    assert "pc.rom" in str(err)


class Tagged(MultiFDMethod):
    """A stand-in method on value 5 (identity payload), to provoke a compression mismatch."""

    name = "tagged"
    value = 5
    threaded = False

    def send_setup(self, channel: int) -> SendContext:
        return NocompSend()

    def recv_setup(self, channel: int) -> RecvContext:
        return NocompRecv()


async def test_compression_mismatch_between_real_ends() -> None:
    net = MemoryNetwork()
    block = RAMBlock("ram", bytearray(b"\x01" * (1 << 20)))
    errors: dict[str, BaseException] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                try:
                    async with open_destination(net.accept, channels=2, method=Tagged()) as dst:
                        await dst.wait()
                except MultiFDError as exc:
                    errors["dst"] = exc
                    for s in net.opened:
                        await s.aclose()

            nursery.start_soon(destination)
            try:
                async with open_source([block], net.connect, channels=2, method="none") as src:
                    await src.complete()
            except MultiFDError as exc:
                errors["src"] = exc
    err = errors["dst"]
    assert isinstance(err, CompressionMismatch), err
    assert "negotiated 5" in str(err) and err.channel in (0, 1)
    assert "src" in errors


def test_registry_with_program_plugin_finds_tagged() -> None:
    import types

    mod = types.ModuleType("tagged_plugin")
    from multifd_core import hookimpl

    @hookimpl
    def multifd_methods():
        return [Tagged]

    mod.multifd_methods = multifd_methods  # type: ignore[attr-defined]
    reg = load_methods(plugins=[mod])
    assert reg.get("tagged").value == 5


@pytest.mark.parametrize("size", [64 << 10, 16 << 20])
async def test_source_with_more_channels_is_refused(size: int, no_leaks: None) -> None:
    """Extra channels must fail the migration, not sit in the backlog with their pages lost."""
    from multifd_core import open_tcp_acceptor, tcp_connector
    from multifd_core.image import vm_like_image

    block = RAMBlock("ram", vm_like_image(size))
    errors: dict[str, BaseException] = {}
    async with await open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def destination() -> None:
                    try:
                        async with open_destination(acceptor, channels=2) as dst:
                            await dst.wait()
                    except MultiFDError as exc:
                        errors["dst"] = exc

                nursery.start_soon(destination)
                try:
                    connect = tcp_connector("127.0.0.1", acceptor.port)
                    async with open_source([block], connect, channels=4) as src:
                        await src.complete()
                except MultiFDError as exc:
                    errors["src"] = exc
    assert isinstance(errors.get("dst"), BadChannelId), errors
