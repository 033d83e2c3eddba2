"""The destination facing bad peers: wrong handshakes, hostile packets, silent connections.

A hand-driven source writes the main stream and the channels byte by byte, so that each test
breaks exactly one rule; the destination must end with the typed error naming it, never write
outside its blocks, and leave no socket behind. A connection that is not this migration's (junk:
another uuid, garbage, a second main channel, silence) is closed with a warning and the
migration goes on: here, with no real source behind, until connect_timeout, whose error names
the refusal (tests/test_junk_connections.py has them beside real migrations).
"""

from __future__ import annotations

from uuid import UUID

import pytest
import trio
from peers import connect_channel, main_setup, refusals, sync_packet

from multifd_core import MemoryNetwork, RAMBlock, load_methods
from multifd_core.errors import (
    BadChannelId,
    BadOffset,
    BlockMismatch,
    ChannelClosed,
    CompressionMismatch,
    DuplicateChannel,
    MigrationTimeout,
    UnknownBlock,
)
from multifd_core.mainstream import MainStreamWriter
from multifd_core.testing import destination_against, guarded_block, identity_method, run_loopback
from multifd_core.wire import MultiFDPacket

PS = 4096
UUID_A = bytes(range(16))
UUID_B = bytes(range(1, 17))


async def expect_destination_error(peer, error: type[BaseException], **options) -> BaseException:
    """Run a destination against ``peer(net)`` over memory streams; return the error it ended
    with, which must be an ``error``."""
    net = MemoryNetwork()
    run = await destination_against(lambda: peer(net), net.accept, timeout=10, **options)
    assert run.error is not None, "the destination did not fail"
    assert isinstance(run.error, error), repr(run.error)
    return run.error


async def between_real_ends(block: RAMBlock, source: dict, destination: dict):
    """Our own source and destination over memory streams, the destination closing every
    stream when it fails (which makes the source fail too); the run, errors captured."""
    return await run_loopback(
        [block],
        source={"channels": 2, **source},
        destination={"channels": 2, **destination},
        close_on_error=True,
        capture_errors=True,
        timeout=10,
    )


async def test_uuid_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    """Another migration's channel: closed with a warning; the connect timeout names it."""
    closed = trio.Event()

    async def peer(net: MemoryNetwork) -> None:
        main = await net.connect()
        await main.send_all(main_setup([("ram", 1 << 20)]))
        other = await connect_channel(net.connect, 0, UUID_B)
        assert await other.receive_some() == b""  # the destination closed it
        closed.set()
        await trio.sleep_forever()

    err = await expect_destination_error(peer, MigrationTimeout, uuid=UUID_A, connect_timeout=1)
    assert closed.is_set()
    mismatch = (
        f"UuidMismatch: channel 0 uuid {UUID(bytes=UUID_B)} does not match {UUID(bytes=UUID_A)}"
    )
    assert str(err) == (
        "only 1 of 3 connections (main + 2 channels) arrived within 1 s; "
        f"1 other connection(s) refused (the first: {mismatch})"
    )
    assert refusals(caplog) == [f"refused a connection: {mismatch}"]


async def test_uuid_mismatch_between_real_ends(caplog: pytest.LogCaptureFixture) -> None:
    """Our own source with another uuid: the destination refuses its channels (junk, each with
    a warning), the source fails on its closed channels and closes its main channel, and the
    destination's error for that names the refusals."""
    block = RAMBlock("ram", bytearray(1 << 20))
    run = await between_real_ends(block, {"uuid": UUID_B}, {"uuid": UUID_A})
    assert isinstance(run.src_error, ChannelClosed), run.src_error
    assert isinstance(run.dst_error, ChannelClosed) and run.dst_error.channel is None
    assert "closed early" in str(run.dst_error)
    assert "other connection(s) refused (the first: UuidMismatch: channel " in str(run.dst_error)
    assert refusals(caplog), "no warning"
    assert all("UuidMismatch" in line and "does not match" in line for line in refusals(caplog))


async def test_channel_id_out_of_range() -> None:
    async def peer(net: MemoryNetwork) -> None:
        await connect_channel(net.connect, 2)  # channels 0..1 only
        await trio.sleep_forever()

    err = await expect_destination_error(peer, BadChannelId)
    assert "channel id 2" in str(err)


async def test_duplicate_channel_id() -> None:
    async def peer(net: MemoryNetwork) -> None:
        await connect_channel(net.connect, 1)
        await connect_channel(net.connect, 1)
        await trio.sleep_forever()

    await expect_destination_error(peer, DuplicateChannel)


async def test_garbage_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def peer(net: MemoryNetwork) -> None:
        s = await net.connect()
        await s.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await trio.sleep_forever()

    err = await expect_destination_error(peer, MigrationTimeout, connect_timeout=1)
    assert "only 0 of 3" in str(err) and "the first: BadMagic: " in str(err)
    [line] = refusals(caplog)
    assert line.startswith("refused a connection: BadMagic: a connection starts with 47455420")


async def test_second_main_channel(caplog: pytest.LogCaptureFixture) -> None:
    async def peer(net: MemoryNetwork) -> None:
        for _ in range(2):
            s = await net.connect()
            await s.send_all(main_setup([("ram", 1 << 20)]))
        await trio.sleep_forever()

    err = await expect_destination_error(peer, MigrationTimeout, connect_timeout=1)
    assert "only 1 of 3" in str(err)
    assert refusals(caplog) == [
        "refused a connection: MainStreamError: a second main channel (QEVM) connected"
    ]


async def test_silent_connection_times_out(caplog: pytest.LogCaptureFixture) -> None:
    """A connection that never says anything: refused after handshake_timeout, not fatal."""

    async def peer(net: MemoryNetwork) -> None:
        await net.connect()  # never says anything
        await trio.sleep_forever()

    err = await expect_destination_error(
        peer, MigrationTimeout, handshake_timeout=0.3, connect_timeout=1.5
    )
    assert str(err).startswith("only 0 of 3 connections")
    assert "the first: MigrationTimeout: sent no handshake within 0.3 s" in str(err)
    assert refusals(caplog) == [
        "refused a connection: MigrationTimeout: sent no handshake within 0.3 s"
    ]


async def test_missing_channels_time_out() -> None:
    async def peer(net: MemoryNetwork) -> None:
        main = await net.connect()
        await main.send_all(main_setup([("ram", 1 << 20)]))
        await connect_channel(net.connect, 0)  # channel 1 never comes
        await trio.sleep_forever()

    err = await expect_destination_error(peer, MigrationTimeout, connect_timeout=0.3)
    assert "2 of 3" in str(err)


async def test_block_mismatch_with_given_blocks() -> None:
    async def peer(net: MemoryNetwork) -> None:
        main = await net.connect()
        await main.send_all(main_setup([("ram", 2 << 20)]))
        await trio.sleep_forever()

    err = await expect_destination_error(
        peer, BlockMismatch, blocks=[RAMBlock("ram", bytearray(1 << 20))]
    )
    assert "2097152" in str(err)


async def hostile_packet_peer(net: MemoryNetwork, packet: bytes, payload: bytes) -> None:
    """A source that sets up, syncs once, then sends one given packet on channel 0."""
    main = await net.connect()
    w = MainStreamWriter()
    w.header()
    w.ram_setup([("ram", 1 << 20)])
    chans = [await connect_channel(net.connect, i) for i in range(2)]
    await main.send_all(w.take())
    for i, ch in enumerate(chans):
        await ch.send_all(sync_packet(i))
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
    block, guarded = guarded_block("ram", size, PS)
    n = len(offsets)
    packet = MultiFDPacket(0, 128, n, n * PS, 99, "ram", offsets).encode(128)
    err = await expect_destination_error(
        lambda net: hostile_packet_peer(net, packet, b"\xee" * (n * PS)),
        error,
        blocks=[block],
    )
    assert err.channel == 0 and err.packet_num == 99
    assert guarded.guards_intact()
    assert b"\xee" not in guarded.buf


async def test_unknown_block_in_packet() -> None:
    packet = MultiFDPacket(0, 128, 1, PS, 5, "pc.rom", [0]).encode(128)
    err = await expect_destination_error(
        lambda net: hostile_packet_peer(net, packet, bytes(PS)), UnknownBlock
    )
    assert "pc.rom" in str(err)


#: A stand-in method on value 5 (identity payload), to provoke a compression mismatch.
Tagged = identity_method("tagged", 5)


async def test_compression_mismatch_between_real_ends() -> None:
    block = RAMBlock("ram", bytearray(b"\x01" * (1 << 20)))
    run = await between_real_ends(block, {"method": "none"}, {"method": Tagged()})
    err = run.dst_error
    assert isinstance(err, CompressionMismatch), err
    assert "negotiated 5" in str(err) and err.channel in (0, 1)
    assert run.src_error is not None


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
    from multifd_core.image import vm_like_image

    block = RAMBlock("ram", vm_like_image(size))
    run = await run_loopback(
        [block],
        transport="tcp",
        source={"channels": 4},
        destination={"channels": 2},
        capture_errors=True,
        timeout=20,
    )
    assert isinstance(run.dst_error, BadChannelId), (run.dst_error, run.src_error)
