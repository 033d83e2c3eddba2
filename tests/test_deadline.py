"""The overall deadline (``deadline=``, ``--deadline``): a migration that has not completed in
time fails with MigrationTimeout on the end that set it, however steadily its peer trickles
bytes (which keeps every idle timeout quiet), and a completed migration is never failed by it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from peers import aclose_all, connect_channel, main_setup
from procs import finish, one_line_error, receiver, spawn

from multifd_core import (
    Connector,
    MemoryNetwork,
    RAMBlock,
    open_source,
    open_tcp_acceptor,
    tcp_connector,
)
from multifd_core.errors import ChannelStalled, ConfigError, MigrationTimeout
from multifd_core.options import DestinationOptions, SourceOptions
from multifd_core.testing import destination_against, run_destination
from multifd_core.testing.harness import DestinationRun

PS = 4096


async def drip(connect: Connector, period: float) -> None:
    """Two channels (their init sent) and a main channel that sends its magic, then the rest of
    its setup one byte every ``period`` seconds, then nothing."""
    channels = [await connect_channel(connect, cid) for cid in range(2)]
    stream = await connect()
    setup = main_setup([("pc.ram", 1 << 20)])  # 63 bytes
    try:
        await stream.send_all(setup[:4])  # QEVM: its handshake, at once
        for byte in setup[4:]:
            await stream.send_all(bytes([byte]))
            await trio.sleep(period)
        await trio.sleep_forever()
    finally:
        await aclose_all([stream, *channels])


def test_deadline_is_validated() -> None:
    with pytest.raises(ConfigError, match="deadline"):
        DestinationOptions(deadline=0)
    with pytest.raises(ConfigError, match="deadline"):
        SourceOptions(deadline=-1.0)
    assert DestinationOptions().deadline is None


async def test_destination_deadline_ends_a_dripping_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A byte every 10 s keeps the idle timeout (30 s) quiet: the deadline ends it."""
    net = MemoryNetwork()
    start = trio.current_time()
    run = await destination_against(
        lambda: drip(net.connect, 10.0), net.accept, timeout=1000, deadline=60.0, idle_timeout=30
    )
    assert isinstance(run.error, MigrationTimeout), repr(run.error)
    assert not isinstance(run.error, ChannelStalled)
    assert "deadline of 60 s" in str(run.error)
    assert trio.current_time() - start == pytest.approx(60.0, abs=1.0)
    assert run.status == "failed"


async def test_without_deadline_the_drip_goes_on(autojump_clock: trio.testing.MockClock) -> None:
    """The same drip without a deadline is still going 10 minutes later (the setup still not
    through): what the deadline is for."""
    net = MemoryNetwork()
    run = DestinationRun()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drip, net.connect, 10.0)
        nursery.start_soon(lambda: run_destination(net.accept, run, channels=2, idle_timeout=30))
        await trio.sleep(600)
        assert not run.done.is_set()
        nursery.cancel_scope.cancel()


async def test_source_deadline_fails_an_unfinished_migration() -> None:
    """The embedding program does not complete in time: the source fails with MigrationTimeout
    (its own body cancelled), and the destination sees the channels close."""
    async with await open_tcp_acceptor("127.0.0.1", 0) as accept:
        run = DestinationRun()
        block = RAMBlock("ram", bytearray(64 * PS))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_destination(accept, run, channels=2))
                with pytest.raises(MigrationTimeout, match=r"deadline of 0\.5 s"):
                    async with open_source(
                        [block], tcp_connector("127.0.0.1", accept.port), deadline=0.5
                    ) as src:
                        await src.send_round()
                        await trio.sleep(30)  # never reached: the deadline cancels this
                await run.done.wait()
    assert src.stats.status == "failed"
    assert run.error is not None


async def test_deadline_stops_at_completion() -> None:
    """A migration that completed before its deadline stays completed, on both ends, however
    long the program then stays inside the blocks."""
    async with await open_tcp_acceptor("127.0.0.1", 0) as accept:
        run = DestinationRun()
        block = RAMBlock("ram", bytearray(b"\x07" * (64 * PS)))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_destination(accept, run, channels=2, deadline=1.0))
                async with open_source(
                    [block], tcp_connector("127.0.0.1", accept.port), deadline=1.0
                ) as src:
                    await src.complete()
                    await trio.sleep(1.5)  # past the deadline, after completion
                await run.done.wait()
    assert src.stats.status == "completed"
    assert run.error is None and run.stats is not None
    assert bytes(run.blocks["ram"].host) == bytes(block.host)


def test_recv_deadline_cli(tmp_path: Path) -> None:
    """`multifd recv --deadline 2` against a source trickling its setup a byte every 0.1 s:
    one line naming the deadline, exit 1, nothing left in DIR."""
    out_dir = tmp_path / "out"
    setup = main_setup([("blk", 1 << 20)])
    with receiver(tmp_path / "ready", out_dir, "--deadline", "2", "--idle-timeout", "30") as (
        recv,
        port,
    ):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            t0 = time.monotonic()
            for byte in setup * 100:
                if recv.poll() is not None or time.monotonic() - t0 > 20:
                    break
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.1)
        received = finish(recv)
    assert received.rc == 1
    line = one_line_error(received, "recv")
    assert "MigrationTimeout" in line and "deadline of 2 s" in line
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_send_deadline_cli(tmp_path: Path) -> None:
    """`multifd send --deadline 1` to a listener that accepts and never reads: the send fails
    with the deadline (its idle timeout is longer), one line, exit 1."""
    data = tmp_path / "blk"
    data.write_bytes(b"\x01" * (64 << 20))
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        args = ["send", "--connect", f"127.0.0.1:{port}", "--deadline", "1"]
        with spawn(*args, "--idle-timeout", "60", str(data)) as send:
            accepted = []
            server.settimeout(10)
            while send.poll() is None and len(accepted) < 3:
                try:
                    accepted.append(server.accept()[0])
                except TimeoutError:
                    break
            sent = finish(send)
            for conn in accepted:
                conn.close()
    assert sent.rc == 1, sent.err
    line = one_line_error(sent, "send")
    assert "MigrationTimeout" in line and "deadline of 1 s" in line, line
