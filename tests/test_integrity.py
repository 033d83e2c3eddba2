"""End-to-end integrity between our own ends: packet checksums and ``verify`` content digests.

A method whose ``recv_pages`` writes a byte short or wrong (``broken_methods.py``) and a byte
flipped in flight by a TCP proxy keep the stream's structure valid: only the checksums can tell,
and they must, naming block, channel and packet, failing both ends (the receiver's files gone).
With integrity off, the same broken method goes unnoticed (the issue's case). Without the
extension a stream is QEMU's own bytes, and a real QEMU 7.2 on either side still works.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import xxhash
from broken_methods import FlipMethod, ShortMethod
from fault_streams import Recorder, counting
from procs import cli_pair

from multifd_core import RAMBlock, SourceOptions, open_tcp_acceptor, tcp_connector
from multifd_core.errors import (
    BadFlags,
    BadVersion,
    ConfigError,
    DestinationFailed,
    IntegrityError,
)
from multifd_core.extension import MULTIFD_EXT_PACKET_CHECKSUM, packet_checksum
from multifd_core.integrity import DIGESTS_KEY, PacketCheck, block_digest, hash_pages, seal
from multifd_core.qemu import qemu_restore
from multifd_core.testing import Link, LoopbackRun, run_loopback
from multifd_core.wire import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC_BYTES,
    MULTIFD_PACKET_SIZE,
    MultiFDInit,
    MultiFDPacket,
    decode_init,
)

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402

#: Loads the harness as a plugin: it puts the ``qemu`` marker on the QEMU_TESTS here.
pytest_plugins = ["qemu_harness"]
QEMU_TESTS = ("test_qemu_72_announces_nothing_and_ignores_our_checksums",)
PS = 4096
HEADER = 1344
UUID = bytes(range(16))
#: the first data packet's payload on a channel: after its init and the setup's SYNC packet
FIRST_PAYLOAD = MULTIFD_INIT_SIZE + HEADER + HEADER


def random_block(size: int = 4 << 20, seed: int = 1, name: str = "ram") -> RAMBlock:
    """Random pages, none zero: every page travels in a packet."""
    return RAMBlock(name, bytearray(random.Random(seed).randbytes(size)))


def file_factory(tmp: Path) -> Callable[[str, int, int], RAMBlock]:
    """Destination blocks backed by files (written with pwrite from the bounce buffer)."""

    def make(name: str, size: int, page_size: int) -> RAMBlock:
        return RAMBlock.from_file(name, tmp / name, size, page_size, create=True)

    return make


# --- the wire: the extension lies in bytes QEMU leaves unused ------------------------------


def test_init_announces_the_extension_in_qemus_unused_bytes() -> None:
    ext = b"MFPY" + (1).to_bytes(2, "big") + MULTIFD_EXT_PACKET_CHECKSUM.to_bytes(2, "big")
    golden = bytes.fromhex("11223344 00000001") + UUID + b"\x03" + bytes(7) + ext + bytes(24)
    init = MultiFDInit(3, UUID, features=MULTIFD_EXT_PACKET_CHECKSUM)
    assert init.encode() == golden
    assert decode_init(golden, num_channels=4) == init
    plain = MultiFDInit(3, UUID).encode()  # QEMU's bytes: zeros there mean "no extension"
    assert plain == golden[:25] + bytes(39)
    assert decode_init(plain, num_channels=4).features == 0
    # without the marker, whatever is there is ignored, as QEMU ignores it
    assert decode_init(golden[:32] + b"MFPx" + golden[36:], num_channels=4).features == 0


def test_init_extension_refusals() -> None:
    good = MultiFDInit(0, features=MULTIFD_EXT_PACKET_CHECKSUM).encode()
    with pytest.raises(BadVersion, match="extension version 2"):
        decode_init(good[:36] + b"\x00\x02" + good[38:], num_channels=1)
    with pytest.raises(BadFlags, match="unknown multifd-py extension features 0x8000"):
        decode_init(good[:38] + b"\x80\x01" + good[40:], num_channels=1)
    with pytest.raises(ConfigError, match="unknown"):
        MultiFDInit(0, features=4).encode()


def test_packet_checksum_rule() -> None:
    """XXH3-64 of the pages, then the header without its bytes 40..47, stored there; QEMU 9's
    zero_pages field (bytes 32..35) untouched."""
    rng = random.Random(2)
    pages = [memoryview(rng.randbytes(PS)) for _ in range(3)]
    packet = MultiFDPacket(0, 128, 2, 2 * PS, 9, "pc.ram", (0, 2 * PS, PS), zero_pages=1)
    plain = packet.encode(zero_pages_field=True)
    sealed = seal(plain, hash_pages(pages[:2]))
    want = xxhash.xxh3_64(b"".join(pages[:2]) + plain[:40] + plain[48:]).intdigest()
    assert packet_checksum(sealed) == want
    assert sealed[:40] == plain[:40] and sealed[48:] == plain[48:]
    assert sealed[32:36] == b"\0\0\0\1"
    PacketCheck(memoryview(sealed), 0, 9, "pc.ram")(pages[:2])
    with pytest.raises(IntegrityError) as info:
        PacketCheck(memoryview(sealed), 1, 9, "pc.ram")([pages[0], pages[2]])
    err = info.value
    assert (err.block, err.channel, err.packet_num) == ("pc.ram", 1, 9)
    assert str(err).startswith("channel 1, packet 9: block 'pc.ram': its pages as written")
    sync = seal(MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, 10).encode(), None)
    PacketCheck(memoryview(sync), 0, 10, None)(())
    with pytest.raises(IntegrityError, match="its header as written"):
        PacketCheck(memoryview(sync[:30] + b"\1" + sync[31:]), 0, 10, None)(())


async def test_integrity_off_sends_qemus_bytes_and_on_only_the_reserved_ones() -> None:
    """The same migration (one channel: one packet order) with integrity off and on: the
    channels differ only in the init packet's bytes 32..39 and every packet's bytes 40..47."""
    streams: dict[bool, list[bytearray]] = {}
    for on in (False, True):
        streams[on] = got = []
        await run_loopback(
            [random_block(1 << 20)],
            rounds=2,
            source={"channels": 1, "integrity": on, "packet_size": MULTIFD_PACKET_SIZE},
            destination={"channels": 1},
            wrap_connect=counting(lambda n, s, got=got: Recorder(s, got)),
            timeout=30,
        )
    (main_off, chan_off), (main_on, chan_on) = streams[False], streams[True]
    assert main_off == main_on
    assert len(chan_off) == len(chan_on) > 10 * HEADER
    assert chan_off[32:64] == bytes(32) and chan_on[32:40] == b"MFPY\0\1\0\1"
    reserved = set(range(32, 40))
    pos, packets = MULTIFD_INIT_SIZE, 0
    while pos < len(chan_on):
        reserved.update(range(pos + 40, pos + 48))
        assert chan_off[pos + 32 : pos + 64] == bytes(32)
        pos += HEADER + int.from_bytes(chan_on[pos + 20 : pos + 24], "big")
        packets += 1
    assert pos == len(chan_on) and packets >= 4
    differ = {i for i in range(len(chan_on)) if chan_on[i] != chan_off[i]}
    assert differ <= reserved and len(differ) > packets  # every packet's checksum is there


# --- a broken method between our own ends, over real TCP ------------------------------------


def assert_integrity_failure(run: LoopbackRun, block: str = "ram") -> IntegrityError:
    """The destination failed with IntegrityError naming block, channel and packet; the
    source failed too (the destination's SHUT said so)."""
    err = run.dst_error
    assert isinstance(err, IntegrityError), repr(err)
    assert err.block == block and err.channel in (0, 1) and isinstance(err.packet_num, int)
    text = str(err)
    assert f"channel {err.channel}, packet {err.packet_num}: block {block!r}" in text, text
    assert isinstance(run.src_error, DestinationFailed), repr(run.src_error)
    assert run.src_stats is None
    return err


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "loop"])
@pytest.mark.parametrize("method", [ShortMethod, FlipMethod], ids=["short", "flip"])
@pytest.mark.parametrize("backing", ["memory", "file"])
async def test_a_broken_method_fails_with_integrity_error(
    tmp_path: Path, method: type[ShortMethod], threaded: bool, backing: str
) -> None:
    cls = type(f"{method.__name__}_{threaded}", (method,), {"threaded": threaded})
    dst: dict[str, Any] = {"channels": 2, "method": cls()}
    if backing == "file":
        dst["block_factory"] = file_factory(tmp_path)
    run = await run_loopback(
        [random_block()],
        transport="tcp",
        source={"channels": 2, "method": cls(), "return_path": True},
        destination=dst,
        capture_errors=True,
        timeout=30,
    )
    assert_integrity_failure(run)
    assert run.dst.destination is not None
    assert run.dst.destination.stats.status == "failed"


async def test_without_integrity_a_broken_method_goes_unnoticed() -> None:
    """The issue's case: integrity off, a method writing a byte short gives other memory and
    both ends succeed."""
    block = random_block()
    run = await run_loopback(
        [block],
        transport="tcp",
        source={"channels": 2, "method": ShortMethod(), "integrity": False},
        destination={"channels": 2, "method": ShortMethod()},
        timeout=30,
    )
    assert run.src_stats is not None and run.dst_stats is not None
    assert run.dst_stats.checksum_packets == 0
    assert run.dst_blocks["ram"].host.tobytes() != bytes(block.memory)


async def test_checksums_on_every_packet_of_a_good_migration(tmp_path: Path) -> None:
    block = random_block()
    run = await run_loopback(
        [block],
        transport="tcp",
        rounds=2,
        between_rounds=lambda r, _: block.mark_dirty(0, 64 * PS),
        source={"channels": 2, "method": "zstd"},
        destination={"channels": 2, "method": "zstd", "block_factory": file_factory(tmp_path)},
        timeout=30,
    )
    assert run.src_stats is not None and run.dst_stats is not None
    assert run.dst_stats.checksum_packets == run.dst_stats.packets == run.src_stats.packets
    assert run.src_stats.as_dict()["integrity"]["checksum-packets"] == run.src_stats.packets
    assert (tmp_path / "ram").read_bytes() == bytes(block.memory)


# --- bytes changed in flight ----------------------------------------------------------------


@asynccontextmanager
async def flipping_proxy(target: int, at: int) -> AsyncIterator[int]:
    """A TCP proxy to 127.0.0.1:``target`` (yields its port) that flips (XOR 0xFF) byte ``at``,
    counted from the start of the connection, of the first multifd channel through it; every
    other byte, both ways, passes as it is."""
    flipped = False

    async def pump(
        src: trio.SocketStream, dst: trio.SocketStream, pos: int, at: int, done: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                if pos <= at < pos + len(data):
                    data = bytearray(data)
                    data[at - pos] ^= 0xFF
                pos += len(data)
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            done.cancel()  # one side reset: end the other direction too

    async def handle(client: trio.SocketStream) -> None:
        nonlocal flipped
        async with client, await trio.open_tcp_stream("127.0.0.1", target) as upstream:
            head = b""
            while len(head) < 4 and (chunk := await client.receive_some(4 - len(head))):
                head += chunk
            flip = -1
            if head == MULTIFD_MAGIC_BYTES and not flipped:
                flipped, flip = True, at
            await upstream.send_all(head)
            async with trio.open_nursery() as both:
                both.start_soon(pump, client, upstream, len(head), flip, both.cancel_scope)
                both.start_soon(pump, upstream, client, 0, -1, both.cancel_scope)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
    assert flipped


async def corrupted_run(at: int, **destination: Any) -> LoopbackRun:
    async with (
        await open_tcp_acceptor("127.0.0.1", 0) as acceptor,
        flipping_proxy(acceptor.port, at) as port,
    ):
        link = Link(tcp_connector("127.0.0.1", port), acceptor, acceptor.aclose)
        return await run_loopback(
            [random_block()],
            transport=link,
            # QEMU's packets: the offsets above count 1344-byte headers
            source={"channels": 2, "return_path": True, "packet_size": MULTIFD_PACKET_SIZE},
            destination={"channels": 2, **destination},
            capture_errors=True,
            timeout=30,
        )


@pytest.mark.parametrize("backing", ["memory", "file"])
async def test_a_payload_byte_flipped_in_flight(tmp_path: Path, backing: str) -> None:
    """nocomp: one byte of a packet's pages changed on the way; the stream stays valid."""
    factory = {"block_factory": file_factory(tmp_path)} if backing == "file" else {}
    run = await corrupted_run(FIRST_PAYLOAD + 1000, **factory)
    err = assert_integrity_failure(run)
    assert err.packet_num is not None and err.packet_num > 0  # a data packet, not the setup


async def test_a_reserved_header_byte_flipped_in_flight() -> None:
    """Byte 63 of a packet header (reserved by QEMU, never read): the header is covered too."""
    run = await corrupted_run(FIRST_PAYLOAD - HEADER + 63)
    assert_integrity_failure(run)


# --- content digests (verify) ---------------------------------------------------------------


async def test_verify_digests_every_block_after_the_last_round(tmp_path: Path) -> None:
    blocks = [random_block(1 << 20, seed=s, name=f"b{s}") for s in range(3)]
    blocks[2].memory[:] = bytes(1 << 20)  # a zero block: zero records only
    described = b'{"mine": [1, 2]}'
    run = await run_loopback(
        blocks,
        transport="tcp",
        rounds=3,
        between_rounds=lambda r, _: blocks[0].mark_dirty(r * PS, PS),
        source={"channels": 2, "verify": True, "description": described},
        destination={"channels": 2, "verify": True, "block_factory": file_factory(tmp_path)},
        timeout=30,
    )
    assert run.src_stats is not None and run.dst_stats is not None
    assert run.src_stats.verified_blocks == run.dst_stats.verified_blocks == 3
    assert run.dst.destination is not None and run.dst.destination.vmdesc is not None
    desc = json.loads(run.dst.destination.vmdesc)
    assert desc["mine"] == [1, 2] and desc[DIGESTS_KEY]["algorithm"] == "xxh3-128"
    for b in blocks:
        want = xxhash.xxh3_128(bytes(b.memory)).hexdigest()
        assert desc[DIGESTS_KEY]["blocks"][b.name] == want


async def test_verify_catches_what_no_checksum_saw() -> None:
    """Packet checksums off, a method writing a byte short, digests on: IntegrityError naming
    the block, before the migration counts as completed; the source hears it (SHUT 1)."""
    run = await run_loopback(
        [random_block()],
        transport="tcp",
        source={"method": ShortMethod(), "integrity": False, "verify": True, "return_path": True},
        destination={"method": ShortMethod()},
        capture_errors=True,
        timeout=30,
    )
    err = run.dst_error
    assert isinstance(err, IntegrityError) and err.block == "ram" and err.channel is None
    assert str(err).startswith("block 'ram': its content after the migration differs"), err
    assert isinstance(run.src_error, DestinationFailed)


async def test_verify_required_but_not_sent() -> None:
    run = await run_loopback(
        [random_block(1 << 20)],
        transport="tcp",
        source={"return_path": True},
        destination={"verify": True},
        capture_errors=True,
        timeout=30,
    )
    assert isinstance(run.dst_error, IntegrityError)
    assert "sent no content digests" in str(run.dst_error)
    assert isinstance(run.src_error, DestinationFailed)


def test_verify_needs_the_description_slot() -> None:
    with pytest.raises(ConfigError, match="not with device_state"):
        SourceOptions(verify=True, device_state=b"\0")
    with pytest.raises(ConfigError, match="JSON object"):
        SourceOptions(verify=True, description=b"[1]")
    with pytest.raises(ConfigError, match="not JSON"):
        SourceOptions(verify=True, description=b"{")
    assert SourceOptions().integrity and not SourceOptions().verify


async def test_block_digest_of_a_sparse_file_allocates_nothing() -> None:
    """A file block is read with pread in windows: its holes (tmpfs) stay holes."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm (tmpfs)")
    path = shm / f"multifd-digest-{os.getpid()}.img"
    size = 40 << 20  # more than two windows
    try:
        with open(path, "wb") as f:
            f.truncate(size)
            f.seek(17 << 20)
            f.write(b"data" * 1000)
        allocated = os.stat(path).st_blocks
        block = RAMBlock.from_file("img", path)
        try:
            got = await block_digest(block, trio.CapacityLimiter(1))
        finally:
            block.close()
        assert got == xxhash.xxh3_128(path.read_bytes()).hexdigest()
        assert os.stat(path).st_blocks == allocated
    finally:
        path.unlink(missing_ok=True)


# --- multifd send / multifd recv --------------------------------------------------------------


def error_line(err: str, command: str) -> str:
    assert err.startswith(f"multifd {command}: error: ") and err.count("\n") == 1, err
    return err


def test_cli_broken_plugin_fails_both_ends_and_leaves_no_file(tmp_path: Path) -> None:
    short = ["--compression", "short"]
    send_rc, send_err, recv_rc, recv_err, out, _ = cli_pair(tmp_path, short, short)
    line = error_line(recv_err, "recv")
    assert "IntegrityError: channel " in line and "block 'disk.img': its pages" in line, line
    assert send_rc != 0 and recv_rc != 0
    assert "DestinationFailed" in error_line(send_err, "send")
    assert os.listdir(out) == []


def test_cli_verify(tmp_path: Path) -> None:
    send_rc, send_err, recv_rc, recv_err, out, data = cli_pair(
        tmp_path, ["--verify", "--json"], ["--verify", "--json"]
    )
    assert send_rc == recv_rc == 0, (send_err, recv_err)
    assert (out / "disk.img").read_bytes() == data
    manifest = json.loads((out / ".multifd-recv.json").read_text())
    padded = data + bytes(-len(data) % PS)  # the block: whole pages
    digest = manifest["description"][DIGESTS_KEY]["blocks"]["disk.img"]
    assert digest == xxhash.xxh3_128(padded).hexdigest()


def test_cli_verify_mismatch_and_missing_digests(tmp_path: Path) -> None:
    args = ["--compression", "short"]
    send_rc, send_err, recv_rc, recv_err, out, _ = cli_pair(
        tmp_path / "a", [*args, "--no-integrity", "--verify"], args
    )
    line = error_line(recv_err, "recv")
    assert "IntegrityError: block 'disk.img': its content after the migration" in line, line
    assert send_rc != 0 and recv_rc != 0 and "DestinationFailed" in send_err
    assert os.listdir(out) == []
    send_rc, send_err, recv_rc, recv_err, out, _ = cli_pair(tmp_path / "b", [], ["--verify"])
    assert "sent no content digests" in error_line(recv_err, "recv")
    assert send_rc != 0 and recv_rc != 0 and os.listdir(out) == []


# --- a real QEMU 7.2 on either side -----------------------------------------------------------


def test_qemu_72_announces_nothing_and_ignores_our_checksums(tmp_path: Path) -> None:
    """QEMU 7.2 -> ``multifd qemu-save``: no channel announces checksums, none is checked, the
    snapshot holds the pattern. That snapshot sent by ``qemu_restore`` with ``integrity=True``
    (a checksum in every packet, announced in every init packet) into a real QEMU 7.2: QEMU
    ignores those bytes and completes with the pattern (~3 s)."""
    qh.skip_unless_qemu("7.2")
    at, size = qh.PATTERN_ADDR, qh.PATTERN_SIZE
    with qh.lab(tmp_path) as lab:
        source = lab.qemu("src", *qh.pattern_loader(lab.tmp))
        source.set_multifd(2, "none")
        snap = tmp_path / "snap"
        save, _ = lab.capture(source, snap, channels=2, method="none")
        out = save.json()
        assert out["packets"] > 0
        assert out["integrity"] == {"checksum-packets": 0, "verified-blocks": 0}
        assert qh.block_image(snap)[at : at + size] == qh.pattern()

        dest = lab.qemu("dst", "-incoming", "defer")
        dest.set_multifd(2, "none")
        dest.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = int(dest.query_migrate()["socket-address"][0]["port"])
        connect = tcp_connector("127.0.0.1", port)
        stats = trio.run(partial(qemu_restore, snap, connect, channels=2, integrity=True))
        assert stats.checksum_packets == stats.packets > 0
        info = dest.wait_migration(60)
        assert info["status"] == "completed", (info, dest.log_tail())
        assert dest.pmemsave(at, size, tmp_path / "dst.mem") == qh.pattern()


# --- what is hashed is what is sent: a copy for live blocks, in place for files --------------


def writer_after_hashing(monkeypatch: pytest.MonkeyPatch, write: Callable[[], None]) -> list[int]:
    """Make the source's packet hashing (send.py's, not the destination's check) run ``write``
    once, right after the second data packet's pages were hashed and before they are sent:
    a writer racing the source."""
    from multifd_core import integrity as integ
    from multifd_core import send

    calls = [0]

    def hash_then_write(pages: Any) -> Any:
        h = integ.hash_pages(pages)
        calls[0] += 1
        if calls[0] == 2:
            write()
        return h

    proxy = SimpleNamespace(hash_pages=hash_then_write, seal=integ.seal)
    monkeypatch.setattr(send, "integrity", proxy)
    return calls


@pytest.mark.parametrize("method", ["none", "zstd"])
async def test_a_live_block_changing_after_hashing_is_sent_as_hashed(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A RAMBlock (live): its packets are copied before hashing, so a change after the hash
    does not reach the wire; the migration completes with the pages as they were hashed."""
    block = random_block(4 << 20)
    before = bytes(block.host)
    second = slice(128 * PS, 256 * PS)  # the second data packet's pages (one channel)
    calls = writer_after_hashing(
        monkeypatch, lambda: block.memory.__setitem__(second, bytes(128 * PS))
    )
    run = await run_loopback(
        [block],
        source={"channels": 1, "method": method, "packet_size": MULTIFD_PACKET_SIZE},
        destination={"channels": 1, "method": method},
        timeout=30,
    )
    assert calls[0] >= 2 and bytes(block.host[second]) == bytes(128 * PS)  # the writer ran
    assert run.dst_blocks["ram"].host == before


async def test_a_file_changing_after_hashing_fails_with_integrity_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FileBlock (not live) is hashed and sent in place, without a copy: the file written
    behind the source's back between the hash and the send is caught, not sent torn."""
    from multifd_core.files import FileBlock

    path = tmp_path / "f.img"
    path.write_bytes(random.Random(3).randbytes(4 << 20))

    def overwrite() -> None:
        with open(path, "r+b") as f:  # the second data packet's pages (one channel)
            f.seek(128 * PS)
            f.write(bytes(128 * PS))

    calls = writer_after_hashing(monkeypatch, overwrite)
    block = FileBlock("ram", path)
    try:
        run = await run_loopback(
            [block],
            transport="tcp",
            source={"channels": 1, "return_path": True, "packet_size": MULTIFD_PACKET_SIZE},
            destination={"channels": 1},
            capture_errors=True,
            timeout=30,
        )
    finally:
        block.close()
    assert calls[0] >= 2
    assert_integrity_failure(run)
