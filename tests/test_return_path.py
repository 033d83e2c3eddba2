"""QEMU's return path (issue 12, item 4): a source with the ``return-path`` capability writes
MIG_CMD_OPEN_RETURN_PATH and MIG_CMD_PING after the stream's header, and waits at the end for
the destination's MIG_RP_MSG_SHUT, written back on the main channel's connection.

The codec and the parser are checked without sockets; ``qemu-save`` against real QEMU 7.2 and
10.0 sources with the capability on: a valid capture ends ``completed`` on both sides with the
source's RAM; a refused one (a compression mismatch) makes QEMU end ``failed``, as SHUT carried a
failure status. Each QEMU case costs one paused 64 MiB TCG guest: about 1-2 s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio

from multifd_core import (
    RAMBlock,
    errors,
    migrate,
    open_destination,
    open_tcp_acceptor,
    tcp_connector,
)
from multifd_core import mainstream as ms
from multifd_core import returnpath as rp
from multifd_core.mainstream import MainStreamParser
from multifd_core.testing import LoopbackRun, run_loopback

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402

pytest_plugins = ["qemu_harness"]
#: the tests that drive QEMU (the harness marks them ``qemu``)
QEMU_TESTS = (
    "test_capture_with_return_path",
    "test_refused_capture_fails_the_source",
    "test_restore_refused_by_qemu",
)

PS = 4096


def be32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def be64(v: int) -> bytes:
    return v.to_bytes(8, "big")


def command(cmd: int, data: bytes = b"") -> bytes:
    return b"\x08" + cmd.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


HEAD = be32(0x5145564D) + be32(3) + b"\x07" + be32(10) + b"pc-q35-7.2"
RAM_START = (
    b"\x01"
    + be32(2)
    + b"\x03ram"
    + be32(0)
    + be32(4)
    + be64(2 * PS | 0x04)
    + b"\x01a"
    + be64(2 * PS)
)
EOS = be64(0x10) + b"\x7e" + be32(2)
OPEN = command(ms.MIG_CMD_OPEN_RETURN_PATH)
VMDESC = b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}'
#: QEMU's device sections (opaque here), its EOF and its VM description
DEVICE = b"\x04" + be32(3) + b"\x05timer" + be32(0) + be32(2) + bytes(24) + b"\x7e" + be32(3)
TAIL = DEVICE + b"\x00\x06" + be32(len(VMDESC)) + VMDESC


def stream(*, return_path: bool) -> bytes:
    pre = OPEN + command(ms.MIG_CMD_PING, be32(1)) if return_path else b""
    between = command(ms.MIG_CMD_PING, be32(7)) if return_path else b""
    return (
        HEAD
        + pre
        + RAM_START
        + EOS
        + b"\x02"
        + be32(2)
        + EOS
        + between
        + b"\x03"
        + be32(2)
        + EOS
        + TAIL
    )


def events(parser: MainStreamParser) -> list[ms.MainEvent]:
    out: list[ms.MainEvent] = []
    while (ev := parser.next_event()) is not ms.NEED_DATA:
        assert not isinstance(ev, ms.NeedData)
        out.append(ev)
        if isinstance(ev, ms.ConnectionEnd):
            break
    return out


# --- the codec --------------------------------------------------------------------------------


def test_message_bytes() -> None:
    """be16 type, be16 length, payload (QEMU's migrate_send_rp_message)."""
    assert rp.shut(0) == b"\x00\x01\x00\x04\x00\x00\x00\x00"
    assert rp.shut(1) == b"\x00\x01\x00\x04\x00\x00\x00\x01"
    assert rp.pong(be32(0xDEADBEEF)) == b"\x00\x02\x00\x04\xde\xad\xbe\xef"


def test_parser_reads_split_messages() -> None:
    parser = rp.ReturnPathParser()
    data = rp.pong(be32(1)) + rp.shut(3)
    got = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while (msg := parser.next_message()) is not None:
            got.append((msg.name, msg.value))
    assert got == [("MIG_RP_MSG_PONG", 1), ("MIG_RP_MSG_SHUT", 3)]
    assert parser.buffered == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x00\x00", "unknown message type 0"),
        (b"\x00\x09\x00\x00", "unknown message type 9"),
        (b"\x00\x01\x00\x05", "SHUT of 5 bytes, expected 4"),
        (b"\x00\x03\x40\x00", "REQ_PAGES_ID of 16384 bytes"),
    ],
)
def test_parser_refuses_bad_messages(data: bytes, match: str) -> None:
    parser = rp.ReturnPathParser()
    parser.feed(data)
    with pytest.raises(errors.MainStreamError, match=match):
        parser.next_message()


# --- the main stream parser -------------------------------------------------------------------


def test_commands_where_qemu_sends_them() -> None:
    """OPEN_RETURN_PATH and PING after the configuration, PING between RAM sections; the
    stream is complete at its VM description, though the connection is still open."""
    data = stream(return_path=True)
    parser = MainStreamParser()
    got: list[ms.MainEvent] = []
    for i in range(0, len(data), 7):  # in pieces, and no end of input yet
        parser.feed(data[i : i + 7])
        got += events(parser)
    cmds = [ev for ev in got if isinstance(ev, ms.Command)]
    assert cmds == [ms.Command(1), ms.Command(2, be32(1)), ms.Command(2, be32(7))]
    assert isinstance(got[-1], ms.StreamComplete)
    device = b"".join(ev.data for ev in got if isinstance(ev, ms.DeviceState))
    assert device == TAIL  # passed through whole
    parser.feed_eof()
    assert events(parser) == [ms.ConnectionEnd()]


def test_no_return_path_no_stream_complete() -> None:
    """Without a return path the source closes: the end of input ends the stream."""
    data = stream(return_path=False)
    parser = MainStreamParser()
    parser.feed(data)
    got = events(parser)
    assert not any(isinstance(ev, ms.StreamComplete) for ev in got)
    parser.feed_eof()
    assert events(parser) == [ms.ConnectionEnd()]


def test_a_device_state_not_ending_in_a_description_is_not_complete() -> None:
    data = stream(return_path=True)
    parser = MainStreamParser()
    parser.feed(data[:-1])  # the JSON's closing brace still to come
    assert not any(isinstance(ev, ms.StreamComplete) for ev in events(parser))
    parser.feed(data[-1:])
    assert isinstance(events(parser)[-1], ms.StreamComplete)


def test_bytes_after_the_description_are_refused() -> None:
    parser = MainStreamParser()
    parser.feed(stream(return_path=True))
    events(parser)
    parser.feed(b"\x00")
    with pytest.raises(errors.MainStreamError, match="after the VM description"):
        events(parser)


@pytest.mark.parametrize("length", [0x600, 0x60000, 0x606])
def test_description_lengths_holding_the_marker(length: int) -> None:
    """The be32 length's own bytes may look like QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION."""
    body = b'{"a": "' + b"x" * (length - 9) + b'"}'
    assert len(body) == length
    assert ms.tail.ends_with_vmdesc(DEVICE + b"\x00\x06" + be32(length) + body)
    assert not ms.tail.ends_with_vmdesc(DEVICE + b"\x00\x06" + be32(length + 1) + body)


# --- between our own ends (item 5) ---------------------------------------------------------


def pages(seed: int) -> RAMBlock:
    block = RAMBlock.allocate("ram", 64 * PS, PS)
    block.host[:] = np.random.default_rng(seed).integers(0, 4, 64 * PS, dtype=np.uint8)
    return block


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_complete_after_the_destinations_shut(transport: str) -> None:
    """complete() returns once the destination's SHUT 0 came: every page is there by then."""
    block = pages(1)
    seen: list[int | None] = []

    async def after(r: int, run: LoopbackRun) -> None:
        assert run.source is not None
        seen.append(run.source.shut_status)  # no SHUT before the end

    run = await run_loopback(
        [block], transport=transport, rounds=2, between_rounds=after, source={"return_path": True}
    )
    assert run.source is not None and run.source.shut_status == rp.RP_SUCCESS
    assert seen == [None]
    assert run.src_stats is not None and run.src_stats.status == "completed"
    dst = run.dst.destination
    assert dst is not None and dst.return_path and dst.shut_sent == rp.RP_SUCCESS
    assert dst.commands[:2] == [ms.MIG_CMD_OPEN_RETURN_PATH, ms.MIG_CMD_PING]
    assert bytes(run.dst_blocks["ram"].host) == bytes(block.host)


async def test_a_destination_idle_timeout_fails_the_source() -> None:
    """The source pauses between rounds past the destination's idle timeout: the destination
    fails (errors.ChannelStalled) and says so in its SHUT; the source fails with that status instead
    of going on to report ``completed``."""

    async def pause(r: int, run: LoopbackRun) -> None:
        await run.dst.done.wait()  # until the destination has given up

    run = await run_loopback(
        [pages(2)],
        transport="tcp",
        rounds=2,
        between_rounds=pause,
        source={"return_path": True, "idle_timeout": None},
        destination={"idle_timeout": 0.2},
        capture_errors=True,
    )
    assert isinstance(run.dst.error, errors.ChannelStalled), run.dst.error
    assert isinstance(run.src_error, errors.DestinationFailed), run.src_error
    assert run.src_error.shut_status == rp.RP_FAILURE


async def test_a_refused_block_fails_the_source() -> None:
    """A block the destination cannot take (another size): SHUT 1, errors.DestinationFailed."""
    run = await run_loopback(
        [pages(3)],
        transport="tcp",
        source={"return_path": True},
        destination={"blocks": [RAMBlock.allocate("ram", 32 * PS, PS)]},
        capture_errors=True,
    )
    assert isinstance(run.dst.error, errors.BlockMismatch), run.dst.error
    assert isinstance(run.src_error, errors.DestinationFailed), run.src_error
    assert run.src_error.shut_status == rp.RP_FAILURE


@pytest.mark.parametrize("work_fails", [False, True])
async def test_the_shut_waits_for_the_programs_work_in_the_block(work_fails: bool) -> None:
    """Every page has landed at ``wait()``, but the SHUT goes only when the program leaves the
    block: the source is still waiting for it meanwhile, and work there that fails (a
    receiver's renames, a digest check) fails the source with DestinationFailed instead of a
    ``completed`` it would have been told before."""
    block = pages(4)
    src_result: list[BaseException | str] = []
    async with await open_tcp_acceptor("127.0.0.1", 0) as accept:

        async def source() -> None:
            try:
                stats = await migrate(
                    [block], tcp_connector("127.0.0.1", accept.port), return_path=True
                )
                src_result.append(stats.status)
            except errors.MultiFDError as exc:
                src_result.append(exc)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source)
                with contextlib.suppress(errors.StorageError):
                    async with open_destination(accept) as dst:
                        await dst.wait()
                        assert dst.shut_sent is None
                        await trio.sleep(0.3)  # the program's own work takes its time
                        assert not src_result  # the source still waits for the SHUT
                        assert bytes(dst.blocks["ram"].host) == bytes(block.host)
                        if work_fails:
                            raise errors.StorageError("DIR/x", errno.ENOSPC, "rename")
    if work_fails:
        assert dst.shut_sent == rp.RP_FAILURE
        assert isinstance(src_result[0], errors.DestinationFailed), src_result
    else:
        assert dst.shut_sent == rp.RP_SUCCESS and src_result == ["completed"]
        assert dst.stats.status == "completed"


def test_writer_opens_the_return_path_after_the_header() -> None:
    w = ms.MainStreamWriter()
    w.header()
    w.open_return_path()
    w.ram_setup([("ram", PS)])
    data = w.take()
    assert data[len(HEAD) : len(HEAD) + 14] == OPEN + command(ms.MIG_CMD_PING, be32(1))
    with pytest.raises(errors.ConfigError):
        w.open_return_path()


# --- against QEMU -----------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[qh.Lab]:
    with qh.lab(tmp_path) as the_lab:
        yield the_lab


@pytest.mark.parametrize(
    ("version", "channels", "method"), [("7.2", 2, "zstd"), ("10.0", 4, "zlib")]
)
def test_capture_with_return_path(lab: qh.Lab, version: str, channels: int, method: str) -> None:
    source = qh.return_path_source(lab, version, channels, method)
    snap = lab.tmp / "snap"
    save, _ = lab.capture(source, snap, channels=channels, method=method)
    out = save.json()
    assert out["status"] == "completed"
    manifest = json.loads((snap / "manifest.json").read_text())
    commands = manifest["stream"]["commands"]
    assert commands[:2] == ["MIG_CMD_OPEN_RETURN_PATH", "MIG_CMD_PING"], commands
    image = qh.block_image(snap, "pc.ram")
    whole = source.pmemsave(0, qh.RAM_SIZE, lab.tmp / "src.mem")
    assert qh.outside_legacy_hole(image, whole), qh.first_difference(image, whole)
    device = (snap / "device-state.bin").read_bytes()
    assert ms.tail.ends_with_vmdesc(device)


#: A refused capture: QEMU's channels and method, qemu-save's, and the error qemu-save names.
REFUSALS = {
    "wrong-method": ((2, "zstd"), (2, "zlib"), "CompressionMismatch"),
    "bad-stream": ((4, "none"), (2, "none"), "BadChannelId"),  # channels 2, 3 out of range
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_refused_capture_fails_the_source(lab: qh.Lab, version: str, case: str) -> None:
    """A compression mismatch, or channels this side refuses: qemu-save exits 1 with one typed
    line, after a SHUT with a failure status; QEMU ends ``failed``, never ``completed``."""
    (src_channels, src_method), (channels, method), error = REFUSALS[case]
    source = qh.return_path_source(lab, version, src_channels, src_method)
    snap = lab.tmp / "snap"
    save = lab.qemu_save(snap, channels=channels, method=method)
    assert save.port is not None
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
    assert save.wait(30) == 1, save.stderr()
    err = save.stderr()
    assert err.startswith("multifd qemu-save: error: ") and err.count("\n") == 1, err
    assert error in err, err
    info = source.wait_migration(30)
    assert info["status"] == "failed", (info, source.log_tail())
    if case == "wrong-method":  # refused at the first packet: the SHUT is what QEMU hears
        assert "Sibling indicated error 1" in source.log_tail()  # our SHUT's status
    # bad-stream: its refused channels may reach QEMU first (a channel error): failed either way
    assert not snap.exists() or not any(snap.iterdir()), sorted(snap.iterdir())


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_restore_refused_by_qemu(lab: qh.Lab, version: str) -> None:
    """A 64 MiB capture into a 128 MiB QEMU: QEMU refuses the RAM block list, and
    ``qemu-restore`` (return path on by default) exits 1 saying the destination failed."""
    source = qh.return_path_source(lab, version, 2, "none")
    snap = lab.tmp / "snap"
    lab.capture(source, snap, channels=2, method="none")
    dest = lab.qemu("dst", "-incoming", "defer", memory="128M", version=version)
    dest.set_multifd(2, "none")
    keep = {} if version == "7.2" else {"exit-on-error": False}  # 9.1+: keeps its error-desc
    dest.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **keep)
    port = int(dest.query_migrate()["socket-address"][0]["port"])
    run = lab.restore(snap, port, 2, "none")
    assert run.wait(60) == 1, run.stderr()
    err = run.stderr()
    assert err.startswith("multifd qemu-restore: error: ") and err.count("\n") == 1, err
    assert "DestinationFailed" in err, err
    if version == "7.2":  # its failed load exits at once, no SHUT: the return path just ends
        assert "without a SHUT" in err, err
        assert dest.proc.wait(10) != 0
    else:  # 10.0 writes SHUT with its failure status, then keeps its error (exit-on-error off)
        assert "SHUT, status 1" in err, err
        info = dest.wait_migration(30)
        assert info["status"] == "failed", info
        assert "load of migration failed" in info.get("error-desc", ""), info
    assert "Size mismatch: pc.ram" in dest.log_tail(), dest.log_tail()
