"""TLS on every channel: real TCP, certificates made here with trustme.

Migrations that must work (server authentication, mutual TLS, several channels, zstd) verify the
destination's memory and that every connection really was TLS; connections that must be refused
(wrong CA, wrong hostname, missing or foreign client certificate, plaintext against TLS) end the
source promptly with a typed error saying why; the destination closes them with a warning saying
why and goes on (they are not this migration's connections: issue 13), until its connect
timeout, whose error names the first refusal. Nothing leaves a socket behind.
"""

from __future__ import annotations

import json
import random
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from certs import PKI, make_pki
from peers import refusals
from procs import finish, receiver, run

from multifd_core import (
    Connector,
    RAMBlock,
    client_context,
    load_methods,
    open_destination,
    open_source,
    open_tcp_acceptor,
    server_context,
    tcp_connector,
    tls_acceptor,
    tls_connector,
)
from multifd_core.errors import (
    ChannelError,
    ConfigError,
    MigrationTimeout,
    MultiFDError,
    TLSError,
)
from multifd_core.image import vm_like_image
from multifd_core.testing import Acceptor, Link, LoopbackRun, open_link, random_files, run_loopback
from multifd_core.transport import ChannelIO

PS = 4096
#: both ends of a refused migration must be done well before any timeout could end them
PROMPT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def zstd_installed() -> bool:
    return "zstd" in {m.name for m in load_methods()}


@dataclass
class Outcome:
    src: Any = None  # MigrationStats or the exception the source ended with
    dst: Any = None
    src_seconds: float = 0.0
    dst_seconds: float = 0.0
    memory: bytearray = field(default_factory=bytearray)
    received: bytes | None = None
    server_streams: list[trio.SSLStream[Any]] = field(default_factory=list)


async def run_migration(
    server: ssl.SSLContext | None,
    connect_wrap: Any,
    *,
    channels: int = 2,
    method: str = "none",
    size: int = 4 << 20,
    rounds: int = 2,
    random_data: bool = False,
    connect_timeout: float = 30.0,
) -> Outcome:
    """One migration over loopback TCP: the destination listens with ``server`` (None: plain),
    the source connects through ``connect_wrap(tcp_connector)``; a failed destination closes
    its listener (as ``multifd recv`` exiting). Each end's result or error."""
    out = Outcome()
    out.memory = (
        bytearray(random.Random(size).randbytes(size)) if random_data else vm_like_image(size)
    )
    block = RAMBlock("ram", out.memory)

    def guest_writes(r: int, _: LoopbackRun) -> None:
        for i in range(0, size, 97 * PS):  # the guest keeps writing
            out.memory[i : i + 8] = (r - 1).to_bytes(8, "little")
            block.mark_dirty(i, 8)

    def with_tls(accept: Acceptor) -> Acceptor:
        if server is None:
            return accept
        tls = tls_acceptor(accept, server)

        async def recording() -> trio.abc.Stream:
            stream = await tls()
            out.server_streams.append(stream)
            return stream

        return recording

    run = await run_loopback(
        [block],
        transport="tcp",
        rounds=rounds,
        between_rounds=guest_writes,
        wrap_connect=connect_wrap,
        wrap_accept=with_tls,
        source={"channels": channels, "method": method},
        destination={"channels": channels, "method": method, "connect_timeout": connect_timeout},
        close_on_error=True,
        capture_errors=True,
        timeout=20,
    )
    out.src = run.src_error or run.src_stats
    out.dst = run.dst_error or run.dst_stats
    out.src_seconds, out.dst_seconds = run.src_seconds, run.dst.seconds
    if run.dst_stats is not None:
        out.received = run.dst_blocks["ram"].host.tobytes()
    return out


def client(pki: PKI, *, hostname: str = "localhost", **files: Any) -> Any:
    files.setdefault("ca_file", pki.ca)
    ctx = client_context(**files)
    return lambda connect: tls_connector(connect, ctx, hostname)


def plain(connect: Connector) -> Connector:
    return connect


def check_completed(out: Outcome, channels: int) -> None:
    assert not isinstance(out.src, BaseException), repr(out.src)
    assert not isinstance(out.dst, BaseException), repr(out.dst)
    assert out.src.status == "completed" and out.dst.status == "completed"
    assert out.received == bytes(out.memory)
    # every connection (main + channels) was TLS 1.3 and completed its handshake
    assert len(out.server_streams) == channels + 1
    assert {s.version() for s in out.server_streams} == {"TLSv1.3"}


# --- migrations that work -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [2, 4])
async def test_server_authenticated_migration(pki: PKI, channels: int, no_leaks: None) -> None:
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    out = await run_migration(server, client(pki), channels=channels)
    check_completed(out, channels)
    assert out.dst.rounds >= 2
    # no client certificate was asked for
    assert all(not s.getpeercert() for s in out.server_streams)


async def test_mutual_tls_migration(pki: PKI, no_leaks: None) -> None:
    server = server_context(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca
    )
    out = await run_migration(
        server, client(pki, cert_file=pki.client_cert, key_file=pki.client_key), channels=3
    )
    check_completed(out, 3)
    for s in out.server_streams:  # the destination saw the source's certificate on each
        names = s.getpeercert()["subjectAltName"]
        assert ("DNS", "source.example") in names


@pytest.mark.skipif(not zstd_installed(), reason="multifd_zstd is not installed")
async def test_mutual_tls_zstd_migration(pki: PKI, no_leaks: None) -> None:
    server = server_context(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca
    )
    out = await run_migration(
        server,
        client(pki, cert_file=pki.client_cert, key_file=pki.client_key),
        channels=2,
        method="zstd",
        size=8 << 20,
        rounds=3,
    )
    check_completed(out, 2)
    assert out.dst.method == "zstd"
    assert out.src.compression_ratio > 1.5


async def test_ip_address_as_hostname(pki: PKI, no_leaks: None) -> None:
    """Connecting to 127.0.0.1 checks the certificate's IP address entry."""
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    out = await run_migration(server, client(pki, hostname="127.0.0.1"), size=256 << 10)
    check_completed(out, 2)


# --- refused: the source stops promptly with a typed error saying why; the destination says
# why in a warning per refused connection, goes on, and its connect timeout names the first one

#: the destination's connect timeout in the refused cases: no source is left to come
REFUSED_CONNECT_TIMEOUT = 2.0


async def refused(
    caplog: pytest.LogCaptureFixture, server: ssl.SSLContext | None, wrap: Any, **kw: Any
) -> tuple[BaseException, str]:
    """A migration whose connections the destination refuses: the source's error, and the
    destination's first warning (every warning says the same; its error names the first)."""
    out = await run_migration(server, wrap, connect_timeout=REFUSED_CONNECT_TIMEOUT, **kw)
    assert isinstance(out.src, MultiFDError), f"source: {out.src!r}"
    assert out.src_seconds < PROMPT, out
    assert out.received is None
    # the destination went on without them: only its connect timeout ended it
    assert isinstance(out.dst, MigrationTimeout), f"destination: {out.dst!r}"
    assert str(out.dst).startswith("only 0 of 3 connections (main + 2 channels) arrived ")
    lines = refusals(caplog)
    assert lines, "no warning"
    assert all(line.startswith("refused a connection from 127.0.0.1:") for line in lines)
    first = lines[0].removeprefix("refused a connection")  # " from HOST:PORT: why"
    assert str(out.dst).endswith(f" other connection(s) refused (the first{first})")
    return out.src, lines[0]


async def test_wrong_ca(pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None) -> None:
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    src, dst = await refused(caplog, server, client(pki, ca_file=pki.other_ca))
    assert isinstance(src, TLSError) and src.channel is None  # the main channel, first
    assert "certificate verify failed" in str(src)
    assert "the server's certificate" in str(src)
    assert ": TLSError: TLS handshake failed: " in dst and "unknown ca" in dst, dst


async def test_server_certificate_from_another_ca(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    server = server_context(cert_file=pki.other_server_cert, key_file=pki.other_server_key)
    src, dst = await refused(caplog, server, client(pki))
    assert isinstance(src, TLSError)
    assert "certificate verify failed" in str(src)
    assert ": TLSError: TLS handshake failed: " in dst, dst


async def test_wrong_hostname(pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None) -> None:
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    src, dst = await refused(caplog, server, client(pki, hostname="wrong.example"))
    assert isinstance(src, TLSError)
    assert "hostname mismatch" in str(src).lower()
    assert "wrong.example" in str(src)
    assert ": TLSError: " in dst and "bad certificate" in dst, dst


async def test_missing_client_certificate(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    server = server_context(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca
    )
    # random data: a source that did not notice would need far more than the socket buffers
    src, dst = await refused(caplog, server, client(pki), size=16 << 20, random_data=True)
    assert ": TLSError: " in dst and "missing client certificate" in dst, dst
    # TLS 1.3: the client's handshake ends before the server checks it; the source learns
    # of the refusal from the closed connection
    assert isinstance(src, ChannelError)


async def test_client_certificate_from_another_ca(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    server = server_context(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca
    )
    wrap = client(pki, cert_file=pki.foreign_cert, key_file=pki.foreign_key)
    src, dst = await refused(caplog, server, wrap, size=16 << 20, random_data=True)
    assert ": TLSError: " in dst and "certificate verify failed" in dst, dst
    assert "the client's certificate" in dst
    assert isinstance(src, ChannelError)


async def test_plaintext_source_to_tls_destination(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    src, dst = await refused(caplog, server, plain, size=16 << 20, random_data=True)
    assert ": TLSError: " in dst and "does not speak TLS" in dst, dst
    assert isinstance(src, ChannelError)


async def test_tls_source_to_plaintext_destination(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    src, dst = await refused(caplog, None, client(pki))
    assert ": BadMagic: " in dst and "the peer uses TLS" in dst, dst
    assert isinstance(src, TLSError)
    assert "TLS handshake failed" in str(src)


# --- the handshake's place and bounds -------------------------------------------------------


async def test_silent_client_does_not_block_other_connections(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    """A connection that never starts its handshake sits in its own task: the source's
    connections are accepted and handshaken meanwhile, and the migration completes; the
    silent one is refused (a warning) after its handshake timeout."""
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    memory = vm_like_image(1 << 20)
    ctx = client_context(ca_file=pki.ca)
    silent_accepted = trio.Event()
    async with open_link("tcp") as link:
        silent = await trio.open_tcp_stream("127.0.0.1", link.address)

        async def accept() -> trio.abc.Stream:
            stream = await link.accept()
            silent_accepted.set()  # the silent connection is accepted first
            return stream

        async def connect() -> trio.abc.Stream:
            await silent_accepted.wait()
            # a handshake held up behind the silent one (3 s) would time out here (2 s)
            return await tls_connector(link.connect, ctx, "localhost", handshake_timeout=2)()

        run = await run_loopback(
            [RAMBlock("ram", memory)],
            transport=Link(connect, tls_acceptor(accept, server)),
            source={"channels": 2},
            destination={"channels": 2, "handshake_timeout": 3},
            timeout=15,
        )
        await silent.aclose()
    assert run.src_stats is not None and run.src_stats.status == "completed"
    assert run.dst_stats is not None and run.dst_stats.status == "completed"
    assert run.dst_blocks["ram"].host.tobytes() == bytes(memory)
    [line] = refusals(caplog)
    assert line.endswith(": MigrationTimeout: sent no handshake within 3 s"), line
    assert run.dst_stats.refused_connections == 1


async def test_destination_handshake_timeout(
    pki: PKI, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    """A client that connects and never speaks TLS: the destination gives up on it after its
    handshake timeout (a warning) and goes on; its connect timeout then names it."""
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    async with await open_tcp_acceptor("127.0.0.1", 0) as acc:
        silent = await trio.open_tcp_stream("127.0.0.1", acc.port)
        port = silent.socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(MigrationTimeout) as info:
            async with open_destination(
                tls_acceptor(acc, server), channels=1, handshake_timeout=0.5, connect_timeout=1.5
            ) as dst:
                await dst.wait()
        assert await silent.receive_some() == b""  # closed by the destination
        await silent.aclose()
    [line] = refusals(caplog)
    assert line == (
        f"refused a connection from 127.0.0.1:{port}: MigrationTimeout: sent no handshake "
        "within 0.5 s"
    )
    assert str(info.value) == (
        "only 0 of 2 connections (main + 1 channels) arrived within 1.5 s; 1 other "
        f"connection(s) refused (the first from 127.0.0.1:{port}: MigrationTimeout: sent no "
        "handshake within 0.5 s)"
    )


async def test_source_handshake_timeout(pki: PKI, no_leaks: None) -> None:
    """A server that accepts and never answers: the connector gives up after its timeout."""
    ctx = client_context(ca_file=pki.ca)
    async with await open_tcp_acceptor("127.0.0.1", 0) as acc:
        connect = tls_connector(
            tcp_connector("127.0.0.1", acc.port), ctx, "localhost", handshake_timeout=0.5
        )
        block = RAMBlock("ram", bytearray(64 << 10))
        with trio.fail_after(10), pytest.raises(TLSError, match="no answer") as info:
            async with open_source([block], connect, channels=1) as src:
                await src.complete()
        assert info.value.channel is None
        assert "main channel" in str(info.value)


async def test_tls_streams_take_the_generic_path(pki: PKI, no_leaks: None) -> None:
    """Zero-copy socket calls are for plain sockets only; TLS streams read and write through
    the SSLStream (a regression here would bypass the encryption)."""
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    ctx = client_context(ca_file=pki.ca)
    async with await open_tcp_acceptor("127.0.0.1", 0) as acc:
        raw = await tcp_connector("127.0.0.1", acc.port)()
        plain_io = ChannelIO(raw)
        assert plain_io.sock is not None and plain_io.tls is None
        await plain_io.aclose()
        await (await acc()).aclose()
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                io = ChannelIO(await tls_acceptor(acc, server)(), 0)
                await io.handshake()
                assert io.sock is None and io.tls is not None
                got = await io.receive_exactly(5, "hello")
                assert bytes(got) == b"hello"
                assert await io.at_eof()
                await io.aclose()

            nursery.start_soon(serve)
            stream = await tls_connector(tcp_connector("127.0.0.1", acc.port), ctx, "localhost")()
            io = ChannelIO(stream, 0)
            assert io.sock is None
            await io.send_all(b"hello")
            await io.aclose()


# --- contexts -------------------------------------------------------------------------------


def test_contexts_are_hardened(pki: PKI) -> None:
    for ctx in (
        client_context(ca_file=pki.ca),
        server_context(cert_file=pki.server_cert, key_file=pki.server_key),
    ):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
    c = client_context(ca_file=pki.ca)
    assert c.check_hostname and c.verify_mode == ssl.CERT_REQUIRED
    s = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    assert s.verify_mode == ssl.CERT_NONE
    m = server_context(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca)
    assert m.verify_mode == ssl.CERT_REQUIRED


def test_context_errors(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs its certificate"):
        client_context(ca_file=pki.ca, key_file=pki.client_key)
    with pytest.raises(ConfigError, match="no such file"):
        client_context(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="no such file"):
        server_context(cert_file=tmp_path / "missing.pem", key_file=pki.server_key)
    with pytest.raises(ConfigError, match="does not match"):
        server_context(cert_file=pki.server_cert, key_file=pki.client_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"garbage\.pem"):
        client_context(ca_file=garbage)
    with pytest.raises(ConfigError, match="hostname"):
        tls_connector(tcp_connector("127.0.0.1", 1), client_context(ca_file=pki.ca), None)


# --- after the handshake --------------------------------------------------------------------


async def tls_pair(pki: PKI, pair: Any) -> tuple[ChannelIO, ChannelIO, trio.abc.Stream]:
    """Two handshaken ChannelIOs over an in-memory transport; also the client's transport."""
    client_raw, server_raw = pair()
    server = server_context(cert_file=pki.server_cert, key_file=pki.server_key)
    cio = ChannelIO(
        trio.SSLStream(client_raw, client_context(ca_file=pki.ca), server_hostname="localhost"), 0
    )
    sio = ChannelIO(await tls_acceptor(lambda: _ready(server_raw), server)(), 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cio.handshake)
        nursery.start_soon(sio.handshake)
    return cio, sio, client_raw


async def _ready(stream: trio.abc.Stream) -> trio.abc.Stream:
    return stream


async def test_corrupt_record_is_a_tls_error(pki: PKI) -> None:
    import trio.testing

    cio, sio, client_raw = await tls_pair(pki, trio.testing.memory_stream_pair)
    await cio.send_all(b"fine")
    assert bytes(await sio.receive_exactly(4, "the first bytes")) == b"fine"
    # an application-data record that was not encrypted by the peer (tampering on the path)
    await client_raw.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))
    with trio.fail_after(5), pytest.raises(TLSError) as info:
        await sio.receive_exactly(64, "a packet header")
    assert info.value.channel == 0
    assert "a packet header" in str(info.value)
    assert "bad record mac" in str(info.value)
    await cio.aclose()
    await sio.aclose()


async def test_close_without_close_notify_is_channel_closed(pki: PKI) -> None:
    """A peer that drops the connection after the handshake is a closed channel, not a TLS
    failure; a clean TLS close is an ordinary end of stream."""
    import trio.testing

    from multifd_core.errors import ChannelClosed

    cio, sio, client_raw = await tls_pair(pki, trio.testing.memory_stream_pair)
    await client_raw.aclose()  # no close_notify
    with trio.fail_after(5), pytest.raises(ChannelClosed) as info:
        await sio.receive_exactly(8, "a packet header")
    assert not isinstance(info.value, TLSError)
    await sio.aclose()

    cio, sio, _ = await tls_pair(pki, trio.testing.memory_stream_pair)
    await cio.send_all(b"last")
    await cio.aclose()  # close_notify
    assert bytes(await sio.receive_exactly(4, "data")) == b"last"
    assert not await sio.receive_into(memoryview(bytearray(8)), "next", eof_ok=True)
    await sio.aclose()


async def test_close_is_bounded_when_the_peer_does_not_read(pki: PKI) -> None:
    """The close_notify cannot be delivered to a peer that stopped reading: aclose gives up
    after a bound instead of hanging (it runs shielded from cancellation)."""
    import trio.testing

    from multifd_core.tls import CLOSE_TIMEOUT

    cio, sio, _ = await tls_pair(pki, trio.testing.lockstep_stream_pair)
    closed = trio.Event()
    async with trio.open_nursery() as nursery:

        async def close() -> None:
            await cio.aclose()
            closed.set()

        nursery.start_soon(close)
        with trio.move_on_after(CLOSE_TIMEOUT + 1):
            await closed.wait()
        finished_in_time = closed.is_set()
        if not finished_in_time:  # unblock the close (shielded) so that the test can fail
            await sio.receive_some()
    assert finished_in_time, "closing a TLS stream waited on a peer that does not read"
    await sio.aclose()


# --- the command ----------------------------------------------------------------------------


def tls_receiver(tmp_path: Path, *args: str) -> Any:
    """``multifd recv`` on 127.0.0.1:0 into tmp_path/out; yields it and its port."""
    return receiver(tmp_path / "ready", tmp_path / "out", *args, timeout=20)


def wait_stderr_line(proc: Any) -> str:
    """The next line ``proc`` writes on stderr (bounded by the test's timeout)."""
    line: str = proc.stderr.readline()
    assert line, "stderr closed"
    return line


def input_files(tmp_path: Path) -> list[Path]:
    sizes = {"a.bin": 3 << 20, "b.bin": 10000, "c.bin": 5 * PS}
    return random_files(tmp_path / "in", sizes, 7, zero={"c.bin"})


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"multifd {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("mutual", [False, True])
def test_cli_send_recv_over_tls(pki: PKI, tmp_path: Path, mutual: bool) -> None:
    files = input_files(tmp_path)
    recv_args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    send_args = ["--tls-ca", str(pki.ca)]  # hostname: 127.0.0.1, the host connected to
    if mutual:
        recv_args += ["--tls-client-ca", str(pki.ca)]
        send_args += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        send_args += ["--tls-hostname", "localhost"]
    with tls_receiver(tmp_path, "--channels", "3", "--json", *recv_args) as (recv, port):
        rc, out, err = run(
            "send",
            "--connect",
            f"127.0.0.1:{port}",
            "--channels",
            "3",
            "--json",
            *send_args,
            *map(str, files),
        )
        assert rc == 0, err
        assert json.loads(out)["status"] == "completed"
        rrc, rout, rerr = finish(recv)
    assert rrc == 0, rerr
    assert json.loads(rout)["status"] == "completed"
    for f in files:
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()


def test_cli_wrong_ca_fails_the_sender_only(pki: PKI, tmp_path: Path) -> None:
    """A send trusting another CA fails at once with the reason; recv says why in one warning
    line, goes on, and a send with the right CA then migrates into it."""
    files = input_files(tmp_path)
    recv_args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    with tls_receiver(tmp_path, *recv_args) as (recv, port):
        rc, _, err = run(
            "send", "--connect", f"127.0.0.1:{port}", "--tls-ca", str(pki.other_ca), str(files[0])
        )
        assert rc == 1
        line = one_error_line(err, "send")
        assert "TLSError" in line and "certificate verify failed" in line, line
        warning = wait_stderr_line(recv)  # recv is still running: it said why, once
        assert warning.startswith("multifd recv: warning: refused a connection from 127.0.0.1:")
        assert "TLSError: TLS handshake failed: " in warning and "unknown ca" in warning
        assert recv.poll() is None
        good = run("send", "--connect", f"127.0.0.1:{port}", "--tls-ca", str(pki.ca), str(files[0]))
        assert good.rc == 0, good.err
        rrc, _, rerr = finish(recv)
    assert rrc == 0, rerr
    assert rerr == ""  # the warning was read above; nothing else
    assert (tmp_path / "out" / files[0].name).read_bytes() == files[0].read_bytes()


def test_cli_tls_option_errors(pki: PKI, tmp_path: Path) -> None:
    f = input_files(tmp_path)[1]
    rc, _, err = run("send", "--connect", "127.0.0.1:9", "--tls-cert", str(pki.client_cert), str(f))
    assert rc == 1 and "--tls-cert needs --tls-key" in one_error_line(err, "send")
    rc, _, err = run("send", "--connect", "127.0.0.1:9", "--tls-key", str(pki.client_key), str(f))
    assert rc == 1 and "--tls-key needs --tls-cert" in one_error_line(err, "send")
    rc, _, err = run(
        "send", "--connect", "127.0.0.1:9", "--tls-ca", str(tmp_path / "nope.pem"), str(f)
    )
    assert rc == 1 and "nope.pem" in one_error_line(err, "send")
    rc, _, err = run("send", "--connect", "unix:/tmp/x.sock", "--tls", str(f))
    assert rc == 1 and "--tls-hostname" in one_error_line(err, "send")
    out = str(tmp_path / "o")
    for args in (["--tls"], ["--tls-client-ca", str(pki.ca)], ["--tls-cert", str(pki.server_cert)]):
        rc, _, err = run("recv", "--listen", "127.0.0.1:0", "--output", out, *args)
        assert rc == 1 and "needs --tls-cert and --tls-key" in one_error_line(err, "recv")
