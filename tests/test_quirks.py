"""QEMU 7.2's wire quirks (shared/WIRE.md), fed to our destination by hand; no QEMU needed.

A real QEMU source sends pages twice, sets SYNC on a page-carrying packet and follows it with an
empty packet of the same number, repeats and skips packet numbers, leaves old block names and
offsets in page-less headers, and may send more SYNC rounds than the main stream has round ends.
Here a hand-driven source does all of that at once and the destination must still end with
exactly the right memory. Then the connection order: multifd channels arriving before the main
channel (``multifd qemu-save`` tells connections apart by their first bytes).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from multifd_core import Connector, MemoryNetwork, RAMBlock, open_source, tcp_connector
from multifd_core.errors import MainStreamError
from multifd_core.image import vm_like_image
from multifd_core.mainstream import NEED_DATA, MainStreamParser, MainStreamWriter, RoundEnd
from multifd_core.qemu import load_manifest
from multifd_core.testing import destination_against, tagged_page
from multifd_core.wire import (
    MULTIFD_FLAG_SYNC,
    MultiFDInit,
    MultiFDPacket,
    compression_flags,
)

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402

PS = 4096
PAGES_ALLOC = 128
RAM, BIOS = "pc.ram", "pc.bios"
SIZES = {RAM: 64 * PS, BIOS: 16 * PS}
VALUES = {"none": 0, "zlib": 1}


class Channel:
    """One hand-written multifd channel: packets as QEMU 7.2 lays them out."""

    def __init__(self, cid: int, method: str) -> None:
        self.cid = cid
        self.flags = compression_flags(VALUES[method])
        self.zlib = zlib.compressobj(1) if method == "zlib" else None
        self.data = bytearray(MultiFDInit(cid).encode())
        self.packets = 0
        self.pages_sent = 0

    def pages(
        self,
        block: str,
        offsets: Sequence[int],
        pages: Sequence[bytes],
        num: int,
        *,
        sync: bool = False,
    ) -> None:
        raw = b"".join(pages)
        if self.zlib is not None:
            payload = self.zlib.compress(raw) + self.zlib.flush(zlib.Z_SYNC_FLUSH)
        else:
            payload = raw
        packet = MultiFDPacket(
            flags=self.flags | (MULTIFD_FLAG_SYNC if sync else 0),
            pages_alloc=PAGES_ALLOC,
            normal_pages=len(offsets),
            next_packet_size=len(payload),
            packet_num=num,
            ramblock=block,
            offsets=tuple(offsets),
        )
        self.data += packet.encode() + payload
        self.packets += 1
        self.pages_sent += len(offsets)

    def empty(self, num: int, *, sync: bool, leftovers: bool = False) -> None:
        """A page-less packet; with ``leftovers``, its header still holds an old packet's block
        name, offsets (unaligned, out of any block) and payload size, as QEMU leaves them."""
        self.packets += 1
        if not leftovers:
            flags = MULTIFD_FLAG_SYNC if sync else 0
            self.data += MultiFDPacket(flags, PAGES_ALLOC, 0, 0, num).encode()
            return
        stale = MultiFDPacket(
            flags=0,
            pages_alloc=PAGES_ALLOC,
            normal_pages=3,
            next_packet_size=0,
            packet_num=num,
            ramblock="/rom@etc/no-such-block",
            offsets=(0x123, 0xDEAD_B000_0000, 1 << 40),
        ).encode()
        header = bytearray(stale)
        struct.pack_into(">I", header, 8, MULTIFD_FLAG_SYNC if sync else 0)  # flags
        struct.pack_into(">I", header, 16, 0)  # normal_pages
        struct.pack_into(">I", header, 20, 777_777)  # next_packet_size: stale
        self.data += header


def build_migration(method: str) -> tuple[bytes, list[Channel], dict[str, bytearray], int]:
    """The main stream, the two channels and the memory they must produce."""
    rng = random.Random(4)
    expect = {name: bytearray(size) for name, size in SIZES.items()}
    ch = [Channel(0, method), Channel(1, method)]
    w = MainStreamWriter(machine_type="pc-q35-7.2")

    def put(block: str, offset: int, data: bytes) -> bytes:
        expect[block][offset : offset + PS] = data
        return data

    # round 0, set-up: the first packet on every channel is a SYNC, both numbered 0
    w.header()
    w.ram_setup(list(SIZES.items()))
    w.eos()
    ch[0].empty(0, sync=True)
    ch[1].empty(0, sync=True)

    # round 1: numbers skip (0 -> 5) and repeat (5 twice, 7 on both channels)
    w.section_part()
    w.zero_page(RAM, 20 * PS)
    a = [put(RAM, i * PS, tagged_page(rng, 100 + i)) for i in range(3)]
    ch[0].pages(RAM, [0, PS, 2 * PS], a, 5)
    ch[0].pages(RAM, [3 * PS], [put(RAM, 3 * PS, tagged_page(rng, 103))], 5)
    # page 1 again, same data, same round, on the other channel (QEMU's duplicate)
    ch[1].pages(RAM, [PS], [a[1]], 7)
    bios = [put(BIOS, i * PS, tagged_page(rng, 200 + i)) for i in range(4)]
    ch[1].pages(BIOS, [0, PS, 2 * PS, 3 * PS], bios, 7)
    # page 10 gets data now and becomes a zero page in round 2
    ch[1].pages(RAM, [10 * PS], [tagged_page(rng, 110)], 8)
    # a SYNC on a page-carrying packet, then an empty flags-0 packet with the same number
    b = [put(RAM, i * PS, tagged_page(rng, 104 + i)) for i in (4, 5)]
    ch[0].pages(RAM, [4 * PS, 5 * PS], b, 9, sync=True)
    ch[0].empty(9, sync=False, leftovers=True)
    ch[1].empty(9, sync=True, leftovers=True)
    w.eos()

    # round 2: page 0 rewritten on the other channel (the SYNC barrier orders it after round 1),
    # page 10 zeroed, a duplicate in one channel's consecutive packets, BIOS page 0 twice
    w.section_part()
    w.zero_page(RAM, 10 * PS)
    expect[RAM][10 * PS : 11 * PS] = bytes(PS)
    ch[1].pages(RAM, [0], [put(RAM, 0, tagged_page(rng, 300))], 10)
    again = put(RAM, 6 * PS, tagged_page(rng, 106))
    ch[1].pages(RAM, [6 * PS], [again], 11)
    ch[1].pages(RAM, [6 * PS], [again], 11)
    ch[1].empty(12, sync=True, leftovers=True)
    bios0 = put(BIOS, 0, tagged_page(rng, 400))
    ch[0].pages(BIOS, [0], [bios0], 12)
    ch[0].pages(BIOS, [0], [bios0], 14)
    ch[0].empty(12, sync=True)
    w.eos()

    # round 3, the end: page 5 again, now on channel 1, in a page-carrying SYNC with its empty
    # twin; then extra SYNC rounds after the main stream has ended
    w.section_end()
    last = [put(RAM, 5 * PS, tagged_page(rng, 505)), put(RAM, 63 * PS, tagged_page(rng, 563))]
    ch[1].pages(RAM, [5 * PS, 63 * PS], last, 15, sync=True)
    ch[1].empty(15, sync=False)
    ch[0].empty(16, sync=True, leftovers=True)
    w.eos()
    w.eof()
    for extra in range(2):
        ch[0].empty(17 + extra, sync=True, leftovers=True)
        ch[1].empty(17 + extra, sync=True)
    return w.take(), ch, expect, 3  # rounds: the setup's sync is not one


@pytest.mark.parametrize("method", ["none", "zlib"])
async def test_qemu_quirks_all_at_once(method: str) -> None:
    main, channels, expect, rounds = build_migration(method)
    net = MemoryNetwork()

    async def source() -> None:
        # channel 1 first, then main, then channel 0: any order works
        streams = [await net.connect(), await net.connect(), await net.connect()]
        for stream, data in zip(streams, [channels[1].data, main, channels[0].data], strict=True):
            await stream.send_all(bytes(data))
        for stream in streams:
            await stream.aclose()

    dst = await destination_against(source, net.accept, timeout=10, channels=2, method=method)
    assert dst.error is None, repr(dst.error)
    stats = dst.stats
    assert stats is not None
    assert stats.status == "completed"
    assert stats.rounds == rounds
    for name, memory in expect.items():
        got = dst.blocks[name].host.tobytes()
        assert got == bytes(memory), f"{name} differs"
    assert stats.normal_pages == sum(c.pages_sent for c in channels) == 19  # duplicates too
    assert stats.zero_pages == 2
    assert stats.packets == sum(c.packets for c in channels)


def test_round_ends_at_the_eos_before_its_footer() -> None:
    """QEMU 7.2 flushes its stream right after a round's EOS record; the section footer after it
    can stay in its buffer while it blocks on the multifd channels. The round (and so the
    channels' release) must not wait for the footer."""
    w = MainStreamWriter()
    w.header()
    w.ram_setup(list(SIZES.items()))
    w.eos()
    stream = w.take()
    parser = MainStreamParser()
    parser.feed(stream[:-5])  # everything but the footer
    events = []
    while (ev := parser.next_event()) is not NEED_DATA:
        events.append(ev)
    assert isinstance(events[-1], RoundEnd)
    parser.feed(stream[-5:])
    assert parser.next_event() is NEED_DATA  # the footer, checked, and nothing more
    parser.feed(b"\x7e")  # not a section
    with pytest.raises(MainStreamError):
        parser.next_event()


# --- channels before the main channel ---------------------------------------------------------


class LateStream(trio.abc.Stream):
    """A main channel that connects only once every multifd channel has connected.

    ``open_source`` connects main first and writes the main stream's header at once; this
    stream holds what is written to it until ``channels`` channels are in ``order``, then
    connects and sends it all: so every multifd channel reaches the destination before the
    main channel does.
    """

    def __init__(self, connect: Connector, order: list[str], channels: int) -> None:
        self._connect = connect
        self._order = order
        self._channels = channels
        self._held = bytearray()
        self._stream: trio.abc.Stream | None = None

    async def _get(self) -> trio.abc.Stream:
        if self._stream is None:
            self._stream = await self._connect()
            self._order.append("main")
            await self._stream.send_all(bytes(self._held))
            self._held.clear()
        return self._stream

    def _early(self) -> bool:
        return self._stream is None and len(self._order) < self._channels

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._early():
            self._held += data
            return
        await (await self._get()).send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        if not self._early():
            await (await self._get()).wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await (await self._get()).receive_some(max_bytes))

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


def late_main_connector(port: int, order: list[str], channels: int) -> Connector:
    connect = tcp_connector("127.0.0.1", port)
    calls = 0

    async def connector() -> trio.abc.Stream:
        nonlocal calls
        calls += 1
        if calls == 1:
            return LateStream(connect, order, channels)
        order.append(f"channel {calls - 2}")
        return await connect()

    return connector


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[qh.Lab]:
    with qh.lab(tmp_path) as the_lab:
        yield the_lab


def test_channels_before_main_complete(lab: qh.Lab) -> None:
    """Every channel connects (init packet written) before main: qemu-save completes."""
    ram = bytearray(vm_like_image(2 << 20, seed=11))
    bios = bytearray(vm_like_image(256 << 10, seed=12))
    blocks = [RAMBlock(RAM, ram), RAMBlock(BIOS, bios)]
    snap = lab.tmp / "snap"
    save = lab.qemu_save(snap, channels=3, method="zstd", timeout=10)
    assert save.port is not None
    order: list[str] = []

    async def source() -> None:
        with trio.fail_after(20):
            connect = late_main_connector(save.port, order, 3)
            async with open_source(blocks, connect, channels=3, method="zstd") as src:
                await src.send_round()
                ram[0:5] = b"later"
                blocks[0].mark_dirty(0, 5)
                await src.complete()

    trio.run(source)
    assert order == ["channel 0", "channel 1", "channel 2", "main"]
    assert save.wait(20) == 0, save.stderr()
    out = save.json()
    assert out["status"] == "completed" and out["ram"]["dirty-sync-count"] == 2
    manifest = load_manifest(snap)
    assert [b["name"] for b in manifest["blocks"]] == [RAM, BIOS]
    assert qh.block_image(snap, RAM) == ram
    assert qh.block_image(snap, BIOS) == bios


@contextmanager
def channels_only(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections to ``port`` that each sent their multifd init packet, closed after."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    try:
        for cid, sock in enumerate(socks):
            sock.sendall(MultiFDInit(cid).encode())
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(tx, rx) queue bytes of the IPv4 TCP socket ``local`` -> ``remote``, from /proc."""

    def hexaddr(addr: tuple[str, int]) -> str:
        return f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}"

    want = (hexaddr(local), hexaddr(remote))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == want:
            tx, rx = fields[4].split(":")
            return int(tx, 16), int(rx, 16)
    return None


def wait_read_by_peer(socks: Sequence[socket.socket], timeout: float = 10) -> None:
    """Wait until the process at the other end of every one of ``socks`` has read all they
    sent (nothing queued on either side: both ends are on this host)."""
    deadline = time.monotonic() + timeout
    for sock in socks:
        mine, theirs = sock.getsockname(), sock.getpeername()
        while _tcp_queues(mine, theirs) != (0, 0) or _tcp_queues(theirs, mine) != (0, 0):
            assert time.monotonic() < deadline, "the peer did not read what was sent"
            time.sleep(0.01)


def test_channels_then_a_main_that_dies(lab: qh.Lab) -> None:
    """Init packets first, then a main channel that sends its magic and closes: a clear error."""
    save = lab.qemu_save(lab.tmp / "snap", channels=2, method="none", timeout=10)
    assert save.port is not None
    with channels_only(save.port, 2) as socks:
        wait_read_by_peer(socks)  # qemu-save has taken both channels' init packets
        main = socket.create_connection(("127.0.0.1", save.port), timeout=5)
        socks.append(main)
        main.sendall(b"QEVM\x00\x00\x00\x03")
        main.close()
        t0 = time.monotonic()
        assert save.wait(20) == 1
        assert time.monotonic() - t0 < 10
    err = save.stderr()
    assert err.startswith("multifd qemu-save: error: ChannelClosed: "), err
    assert "main stream truncated" in err


def test_channels_and_no_main(lab: qh.Lab) -> None:
    """Init packets and no main channel ever: qemu-save gives up after --timeout."""
    save = lab.qemu_save(lab.tmp / "snap", channels=2, method="none", timeout=2)
    assert save.port is not None
    with channels_only(save.port, 2):
        t0 = time.monotonic()
        assert save.wait(20) == 1
        assert time.monotonic() - t0 < 10
    err = save.stderr()
    assert "MigrationTimeout" in err and "2 of 3 connections" in err, err
