"""Errors out of plugin code: a ``MethodError`` naming method, channel and packet.

A method whose ``send_prepare`` makes a payload over its own ``payload_size`` bound is stopped by
the sender before the packet goes (the receiver would refuse it with BadPacketSize, and the
sender only saw "peer gone"); an exception out of any of its calls, in a worker thread or on the
event loop, is a MethodError whose ``__cause__`` is the plugin's exception, and both ends end.
A DecompressionError from ``recv_pages`` is the peer's fault and stays one. The methods are
``broken_methods.RaisingMethod`` (its option ``fail`` names the call that raises), in process
and installed as a plugin of ``multifd send`` / ``multifd recv`` subprocesses.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import pytest
from broken_methods import RaisingInline, RaisingMethod
from procs import Result, cli_pair, one_line_error

from multifd_core import RAMBlock
from multifd_core.errors import (
    ChannelClosed,
    DecompressionError,
    DestinationFailed,
    MethodError,
    MultiFDError,
)
from multifd_core.testing import LoopbackRun, run_loopback
from multifd_core.wire import MULTIFD_PACKET_SIZE

PS = 4096
#: 8 full packets of random pages; with one channel packet 0 is the setup's SYNC, so the data
#: packets are 1..8 and ``after=N`` makes packet N + 1 the one that fails
BLOCK_SIZE = 4 << 20
METHODS = [RaisingMethod, RaisingInline]
IDS = ["thread", "loop"]


def random_block() -> RAMBlock:
    return RAMBlock("ram", bytearray(random.Random(1).randbytes(BLOCK_SIZE)))


async def migrate(
    src: RaisingMethod,
    dst: RaisingMethod,
    *,
    channels: int = 1,
    return_path: bool = False,
    **dst_options: Any,
) -> LoopbackRun:
    return await run_loopback(
        [random_block()],
        transport="tcp",
        # QEMU's 128-page packets: the packet numbers above count them
        source={
            "channels": channels,
            "method": src,
            "return_path": return_path,
            "packet_size": MULTIFD_PACKET_SIZE,
        },
        destination={"channels": channels, "method": dst, **dst_options},
        capture_errors=True,
        timeout=30,
    )


def method_error(err: MultiFDError | None, call: str) -> MethodError:
    """``err`` is a MethodError for ``call``, its cause the plugin's ValueError (``Failing``)."""
    assert isinstance(err, MethodError), repr(err)
    assert isinstance(err.__cause__, ValueError), repr(err.__cause__)
    assert str(err.__cause__) == f"{call} is broken"
    assert str(err).endswith(f": {call} raised ValueError: {call} is broken"), str(err)
    assert "\n" not in str(err)
    return err


# --- a payload over the method's payload_size bound ------------------------------------


@pytest.mark.parametrize("return_path", [False, True], ids=["no-rp", "rp"])
@pytest.mark.parametrize("method", METHODS, ids=IDS)
async def test_a_payload_over_its_bound_fails_the_sender_before_it_is_sent(
    method: type[RaisingMethod], return_path: bool, no_leaks: None
) -> None:
    run = await migrate(method(fail="oversize", after=1), method(), return_path=return_path)
    err = run.src_error
    assert isinstance(err, MethodError), repr(err)  # not DestinationFailed, nor ChannelClosed
    raw = 128 * PS
    bound = raw + raw // 8 + 4096
    assert str(err) == (
        f"method {method.name!r}, channel 0, packet 2: send_prepare made a payload of "
        f"{bound + 1} bytes for 128 pages ({raw} bytes), outside its payload_size bound "
        f"1..{bound}: a receiver refuses it"
    )
    assert (err.method, err.channel, err.packet_num) == (method.name, 0, 2)
    # the destination never saw the packet (it would refuse it: BadPacketSize); it sees the
    # source's channels close
    assert isinstance(run.dst_error, ChannelClosed), repr(run.dst_error)
    assert run.dst.destination is not None
    assert run.dst.destination.stats.packets == 2  # the SYNC and packet 1
    assert run.source is not None and run.source.stats.packets == 2


# --- exceptions out of the method's calls ------------------------------------------------


@pytest.mark.parametrize("return_path", [False, True], ids=["no-rp", "rp"])
@pytest.mark.parametrize("method", METHODS, ids=IDS)
async def test_recv_pages_raising_is_a_method_error_and_the_source_ends(
    method: type[RaisingMethod], return_path: bool, no_leaks: None
) -> None:
    run = await migrate(method(), method(fail="recv_pages", after=2), return_path=return_path)
    err = method_error(run.dst_error, "recv_pages")
    assert str(err).startswith(f"method {method.name!r}, channel 0, packet 3: ")
    assert (err.method, err.channel, err.packet_num) == (method.name, 0, 3)
    # the source ends too: the destination told it (return path), or closed on it
    want = DestinationFailed if return_path else ChannelClosed
    assert isinstance(run.src_error, want), repr(run.src_error)
    assert run.dst.destination is not None
    assert run.dst.destination.stats.status == "failed"


@pytest.mark.parametrize("method", METHODS, ids=IDS)
async def test_send_prepare_raising_is_a_method_error_at_the_source(
    method: type[RaisingMethod], no_leaks: None
) -> None:
    run = await migrate(method(fail="send_prepare", after=3), method(), return_path=True)
    err = method_error(run.src_error, "send_prepare")
    assert str(err).startswith(f"method {method.name!r}, channel 0, packet 4: ")
    assert isinstance(run.dst_error, ChannelClosed), repr(run.dst_error)


async def test_a_method_error_names_the_channel_it_happened_on() -> None:
    """Two channels: each context fails on its own first data packet; whichever comes first
    names its own channel and packet."""
    run = await migrate(RaisingMethod(), RaisingMethod(fail="recv_pages"), channels=2)
    err = method_error(run.dst_error, "recv_pages")
    match = re.fullmatch(r"method 'raising', channel (\d), packet (\d+): .*", str(err))
    assert match is not None, str(err)
    assert (err.channel, err.packet_num) == (int(match[1]), int(match[2]))
    assert err.channel in (0, 1) and err.packet_num is not None and err.packet_num >= 2


async def test_send_setup_raising_names_its_channel() -> None:
    # the source dies during its setup: its main channel had sent its header, so the
    # destination fails at once (closed early), not at its connect timeout (far beyond the
    # harness's 30 s bound here)
    run = await migrate(
        RaisingMethod(fail="send_setup", after=1), RaisingMethod(), channels=2, connect_timeout=600
    )
    err = method_error(run.src_error, "send_setup")
    assert str(err).startswith("method 'raising', channel 1: ")
    assert (err.channel, err.packet_num) == (1, None)
    assert isinstance(run.dst_error, ChannelClosed), repr(run.dst_error)


async def test_recv_setup_raising_names_its_channel() -> None:
    run = await migrate(
        RaisingMethod(), RaisingMethod(fail="recv_setup", after=1), channels=2, return_path=True
    )
    err = method_error(run.dst_error, "recv_setup")
    assert str(err).startswith("method 'raising', channel 1: ")
    assert run.src_error is not None


async def test_send_cleanup_raising_fails_the_source() -> None:
    """Every page went and landed; the source's plugin then fails: the source says so (its
    other channel's cleanup, failing too once the migration failed, is only logged)."""
    run = await migrate(RaisingMethod(fail="send_cleanup"), RaisingMethod(), channels=2)
    err = method_error(run.src_error, "send_cleanup")
    assert re.match(r"method 'raising', channel \d: ", str(err)), str(err)
    assert run.dst_error is None and run.dst_stats is not None


@pytest.mark.parametrize("return_path", [False, True], ids=["no-rp", "rp"])
async def test_recv_cleanup_raising_fails_the_destination(return_path: bool) -> None:
    run = await migrate(
        RaisingMethod(), RaisingMethod(fail="recv_cleanup"), channels=2, return_path=return_path
    )
    err = method_error(run.dst_error, "recv_cleanup")
    assert re.match(r"method 'raising', channel \d: ", str(err)), str(err)
    assert run.dst.destination is not None
    assert run.dst.destination.stats.status == "failed"
    if return_path:  # the contexts go before the SHUT: the source hears of the failure
        assert isinstance(run.src_error, DestinationFailed), run.src_error
        assert run.dst.destination.shut_sent == 1


async def test_payload_size_raising_at_either_end() -> None:
    # the destination calls it once for the channel's buffer, then for each data packet
    run = await migrate(RaisingMethod(), RaisingMethod(fail="payload_size", after=2))
    err = method_error(run.dst_error, "payload_size")
    assert str(err).startswith("method 'raising', channel 0, packet 2: ")
    # the source, for the first data packet (then for each other size of packet)
    run = await migrate(RaisingMethod(fail="payload_size"), RaisingMethod())
    err = method_error(run.src_error, "payload_size")
    assert str(err).startswith("method 'raising', channel 0, packet 1: ")


class CorruptRecv(RaisingMethod):
    """Its ``recv_pages`` refuses every payload as corrupt: the contract's way, the peer's
    fault, so not a MethodError."""

    def recv_setup(self, channel: int) -> Any:
        ctx = super().recv_setup(channel)

        def refuse(payload: memoryview, pages: Any) -> None:
            raise DecompressionError("not a payload of mine")

        ctx.recv_pages = refuse
        return ctx


async def test_a_decompression_error_stays_the_peers_fault() -> None:
    run = await migrate(RaisingMethod(), CorruptRecv())
    err = run.dst_error
    assert type(err) is DecompressionError, repr(err)
    assert str(err) == "channel 0, packet 1: not a payload of mine"


# --- the command line: one line, exit status 1 -------------------------------------------


CLI_CASES = {
    "recv_pages": (["-o", "after=2"], ["-o", "fail=recv_pages", "-o", "after=2"], "recv"),
    "recv_setup": ([], ["-o", "fail=recv_setup"], "recv"),
    "send_prepare": (["-o", "fail=send_prepare", "-o", "after=2"], [], "send"),
    "oversize": (["-o", "fail=oversize", "-o", "after=2"], [], "send"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_prints_one_line_for_a_plugin_that_raises(tmp_path: Any, case: str) -> None:
    send_opts, recv_opts, failing = CLI_CASES[case]
    method = ["--compression", "raising"]
    send_rc, send_err, recv_rc, recv_err, out, _ = cli_pair(
        tmp_path, [*method, "--packet-size", "512K", *send_opts], [*method, *recv_opts]
    )
    assert send_rc == 1 and recv_rc == 1, (send_err, recv_err)
    sent = one_line_error(Result(send_rc, "", send_err), "send")
    got = one_line_error(Result(recv_rc, "", recv_err), "recv")
    line, other = (got, sent) if failing == "recv" else (sent, got)
    call = "send_prepare" if case == "oversize" else case
    where = r"channel \d" if case == "recv_setup" else r"channel \d, packet \d+"
    assert re.search(rf"error: MethodError: method 'raising', {where}: {call} ", line), line
    assert "MethodError" not in other, other  # the other end: its peer failed
    assert "Traceback" not in send_err + recv_err and "ExceptionGroup" not in send_err + recv_err
    assert os.listdir(out) == []


@pytest.mark.parametrize("end", ["source", "destination"])
async def test_a_cleanup_raising_after_a_failure_is_a_warning(
    end: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The migration fails at the other end; this end's channels end on that failure and
    their cleanup raises too: the error stays the one that tells what went wrong, and each
    failed cleanup is a WARNING naming method and channel."""
    if end == "source":
        src, dst = RaisingMethod(fail="send_cleanup"), RaisingMethod(fail="recv_pages")
        call, logger, failed = "send_cleanup", "multifd_core.send", DestinationFailed
    else:
        src, dst = RaisingMethod(fail="send_prepare", after=1), RaisingMethod(fail="recv_cleanup")
        call, logger, failed = "recv_cleanup", "multifd_core.recv", ChannelClosed
    run = await migrate(src, dst, channels=2, return_path=True)
    err = run.src_error if end == "source" else run.dst_error
    assert isinstance(err, failed), repr(err)
    warned = sorted(r.getMessage() for r in caplog.records if r.name == logger)
    assert warned == [
        f"method 'raising', channel {c}: {call} raised ValueError: {call} is broken "
        "(the migration had failed or was cancelled)"
        for c in (0, 1)
    ]
    assert all(r.levelname == "WARNING" for r in caplog.records if r.name == logger)
