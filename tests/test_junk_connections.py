"""Junk connections never abort a migration (issue 13): a connection that is not this migration's
is closed with one warning saying why and from where, and the migration goes on.

Real TCP and real TLS (trustme certificates, mutual TLS). Every kind of junk (a bare connect and
close, silence past the handshake timeout, garbage, a TLS client at a plain listener, plaintext
at a TLS one, a client without a certificate or with one from another CA, another migration's
uuid, another init version, a truncated init packet, a second main channel) is thrown at a
destination before its migration and during it (between rounds, the silent one left pending
across the rounds after): the migration completes and its memory verifies, each junk
connection was closed by the destination and logged once on ``multifd_core.accept`` at WARNING,
and no task or socket is left. The bound on pending handshakes: silent connections up to it,
then the source connects and gets through (the oldest silent ones are dropped). The command:
``multifd send`` into ``multifd recv`` with junk thrown at recv completes and verifies, one
warning line each on recv's stderr.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from certs import PKI, make_pki
from peers import refusals
from procs import finish, receiver, run

from multifd_core import (
    Connector,
    RAMBlock,
    client_context,
    open_source,
    server_context,
    tcp_connector,
    tls_acceptor,
    tls_connector,
)
from multifd_core.errors import ConfigError, TLSError
from multifd_core.image import vm_like_image
from multifd_core.options import DestinationOptions
from multifd_core.testing import (
    Acceptor,
    DestinationRun,
    LoopbackRun,
    open_link,
    random_files,
    run_destination,
    run_loopback,
)
from multifd_core.wire import MultiFDInit

PS = 4096
SIZE = 4 << 20
HOST = "127.0.0.1"
UUID = uuidlib.UUID(int=0x5EED).bytes  # the migration's
OTHER = uuidlib.UUID(int=0xBAD).bytes  # another migration's
#: bound on every wait for the destination to close a junk connection
CLOSE_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Ends:
    """How the source and the junk reach the destination: plain TCP or mutual TLS."""

    mode: str  # "plain" or "mtls"
    pki: PKI
    port: int = 0

    @property
    def tls(self) -> bool:
        return self.mode == "mtls"

    def wrap_accept(self, accept: Acceptor) -> Acceptor:
        if not self.tls:
            return accept
        server = server_context(
            cert_file=self.pki.server_cert, key_file=self.pki.server_key, client_ca_file=self.pki.ca
        )
        return tls_acceptor(accept, server)

    def client(self, **files: Path) -> Callable[[Connector], Connector]:
        ctx = client_context(ca_file=self.pki.ca, **files)
        return lambda connect: tls_connector(connect, ctx, "localhost")

    def wrap_connect(self, connect: Connector) -> Connector:
        """The source's (and the protocol-speaking junk's) connections: TLS with the client
        certificate of the destination's CA under mutual TLS."""
        if not self.tls:
            return connect
        return self.client(cert_file=self.pki.client_cert, key_file=self.pki.client_key)(connect)

    async def raw(self) -> trio.abc.Stream:
        return await trio.open_tcp_stream(HOST, self.port)

    async def speaking(self) -> trio.abc.Stream:
        """A connection that passes this side's TLS, if any: it can say wrong things."""
        return await self.wrap_connect(tcp_connector(HOST, self.port))()


async def until_closed(stream: trio.abc.Stream) -> None:
    """Read until the destination has closed ``stream`` (end of stream, a reset, a TLS
    alert), then close it here too."""
    with trio.fail_after(CLOSE_TIMEOUT):
        try:
            while await stream.receive_some():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await stream.aclose()


async def connect_close(ends: Ends) -> None:
    await (await ends.raw()).aclose()


async def silent(ends: Ends) -> None:
    await until_closed(await ends.raw())


async def garbage(ends: Ends) -> None:
    stream = await ends.raw()
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: \x1b[31mx\r\n\r\n")
    await until_closed(stream)


async def tls_client_at_plain(ends: Ends) -> None:
    with pytest.raises(TLSError):  # the destination reads its hello as junk and closes
        await ends.client()(tcp_connector(HOST, ends.port))()


async def without_certificate(ends: Ends) -> None:
    # TLS 1.3: the client's handshake ends before the server checks; the alert comes after
    await until_closed(await ends.client()(tcp_connector(HOST, ends.port))())


async def foreign_certificate(ends: Ends) -> None:
    connect = ends.client(cert_file=ends.pki.foreign_cert, key_file=ends.pki.foreign_key)
    await until_closed(await connect(tcp_connector(HOST, ends.port))())


async def says(ends: Ends, data: bytes, *, close: bool = False) -> None:
    stream = await ends.speaking()
    await stream.send_all(data)
    if close:
        await stream.aclose()
    else:
        await until_closed(stream)


async def other_uuid(ends: Ends) -> None:
    await says(ends, MultiFDInit(0, OTHER).encode())


async def bad_version(ends: Ends) -> None:
    await says(ends, MultiFDInit(0, UUID, version=7).encode())


async def truncated_init(ends: Ends) -> None:
    await says(ends, MultiFDInit(1, UUID).encode()[:10], close=True)


async def second_main(ends: Ends) -> None:
    await says(ends, b"QEVM\x00\x00\x00\x03")


@dataclass(frozen=True)
class Junk:
    name: str
    act: Callable[[Ends], Awaitable[None]]
    #: what the destination's warning says, under plain TCP and under mutual TLS
    plain: str | None
    mtls: str | None
    during_only: bool = False  # a QEVM before the migration's would be its main channel

    def says(self, mode: str) -> str | None:
        return self.plain if mode == "plain" else self.mtls


HANDSHAKE_TIMEOUT = 1.0
TLS_FAILED = "TLSError: TLS handshake failed: "
KINDS = [
    Junk(
        "connect-close",
        connect_close,
        "ChannelClosed: closed by peer before its first message",
        TLS_FAILED,
    ),
    Junk(
        "silent",
        silent,
        f"MigrationTimeout: sent no handshake within {HANDSHAKE_TIMEOUT} s",
        f"MigrationTimeout: sent no handshake within {HANDSHAKE_TIMEOUT} s",
    ),
    Junk(
        "garbage",
        garbage,
        "BadMagic: a connection starts with 47455420: neither a main channel",
        TLS_FAILED,
    ),
    Junk("tls-at-plain", tls_client_at_plain, "BadMagic: a connection starts with 1603", None),
    Junk("no-certificate", without_certificate, None, TLS_FAILED),
    Junk("foreign-certificate", foreign_certificate, None, TLS_FAILED),
    Junk(
        "other-uuid",
        other_uuid,
        f"UuidMismatch: channel 0 uuid {uuidlib.UUID(bytes=OTHER)} does not match",
        f"UuidMismatch: channel 0 uuid {uuidlib.UUID(bytes=OTHER)} does not match",
    ),
    Junk(
        "bad-version",
        bad_version,
        "BadVersion: init packet version 7, expected 1",
        "BadVersion: init packet version 7, expected 1",
    ),
    Junk(
        "truncated-init",
        truncated_init,
        "ChannelClosed: closed by peer in the middle of its init packet (6 of 60 bytes)",
        "ChannelClosed: closed by peer in the middle of its init packet (6 of 60 bytes)",
    ),
    Junk(
        "second-main",
        second_main,
        "MainStreamError: a second main channel (QEVM) connected",
        "MainStreamError: a second main channel (QEVM) connected",
        during_only=True,
    ),
]
#: what each TLS failure says beyond TLS_FAILED
TLS_WHY = {
    "connect-close": "the client closed the connection",
    "garbage": "the client does not speak TLS",
    "no-certificate": "missing client certificate",
    "foreign-certificate": "certificate verify failed: the client's certificate",
}


def kinds_for(mode: str, phase: str) -> list[Junk]:
    return [
        k for k in KINDS if k.says(mode) is not None and not (k.during_only and phase == "before")
    ]


async def migrate_amid_junk(
    ends: Ends, kinds: list[Junk], phase: str
) -> tuple[LoopbackRun, bytearray]:
    """Migrate SIZE bytes in three rounds (the guest writing between them) over ``ends``,
    throwing every kind of ``kinds`` at the destination before the source connects
    (``phase`` "before") or after the first round ("during"; the silent one is left pending
    across the rounds after). Every junk connection must have been closed by the destination."""
    memory = vm_like_image(SIZE)
    block = RAMBlock("ram", memory)
    thrown = trio.Event()
    async with open_link("tcp") as link, trio.open_nursery() as pending:
        assert isinstance(link.address, int)
        ends.port = link.address

        async def throw() -> None:
            async with trio.open_nursery() as nursery:
                for kind in kinds:
                    if kind.name == "silent" and phase == "during":
                        pending.start_soon(kind.act, ends)  # outlives this round
                    else:
                        nursery.start_soon(kind.act, ends)
            thrown.set()

        def gated(connect: Connector) -> Connector:
            connect = ends.wrap_connect(connect)

            async def after_the_junk() -> trio.abc.Stream:
                await thrown.wait()
                return await connect()

            return after_the_junk

        async def between(r: int, _: LoopbackRun) -> None:
            for i in range(0, SIZE, 61 * PS):  # the guest keeps writing
                memory[i : i + 8] = r.to_bytes(8, "little")
                block.mark_dirty(i, 8)
            if r == 1 and phase == "during":
                await throw()

        if phase == "before":
            pending.start_soon(throw)
        else:
            thrown.set()
        run = await run_loopback(
            [block],
            transport=link,
            rounds=3,
            between_rounds=between,
            wrap_connect=gated,
            wrap_accept=ends.wrap_accept,
            source={"channels": 2, "uuid": UUID},
            destination={"channels": 2, "uuid": UUID, "handshake_timeout": HANDSHAKE_TIMEOUT},
            timeout=40,
        )
    return run, memory


def check_refusals(caplog: pytest.LogCaptureFixture, kinds: list[Junk], mode: str) -> None:
    """One warning per junk connection, from its address, saying what was wrong."""
    lines = refusals(caplog)
    assert len(lines) == len(kinds), lines
    assert all(line.startswith(f"refused a connection from {HOST}:") for line in lines), lines
    for kind in kinds:
        said = kind.says(mode)
        assert said is not None
        why = TLS_WHY.get(kind.name, "") if mode == "mtls" else ""
        matching = [line for line in lines if said in line and why in line]
        assert matching, (kind.name, said, lines)


@pytest.mark.parametrize("mode", ["plain", "mtls"])
@pytest.mark.parametrize("phase", ["before", "during"])
async def test_junk_does_not_abort_a_migration(
    pki: PKI, mode: str, phase: str, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    kinds = kinds_for(mode, phase)
    run, memory = await migrate_amid_junk(Ends(mode, pki), kinds, phase)
    assert run.src_stats is not None and run.src_stats.status == "completed"
    assert run.dst_stats is not None and run.dst_stats.status == "completed"
    assert run.dst_stats.rounds == 3
    assert run.dst_blocks["ram"].host.tobytes() == bytes(memory)
    check_refusals(caplog, kinds, mode)
    assert run.dst_stats.refused_connections == len(kinds)
    assert run.dst_stats.as_dict()["refused-connections"] == len(kinds)


# --- the bound on pending handshakes ------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "mtls"])
async def test_silent_flood_up_to_the_bound_then_the_source(
    pki: PKI, mode: str, caplog: pytest.LogCaptureFixture, no_leaks: None
) -> None:
    """``bound`` silent connections hold every pending slot when the source connects: a
    connection of the source arriving at the bound drops the oldest silent one (closed, a
    warning saying so), every connection of the source gets through, and the migration
    completes; the silent ones left are refused as they close."""
    bound, channels = 6, 2
    ends = Ends(mode, pki)
    memory = vm_like_image(SIZE)
    run = DestinationRun()
    async with open_link("tcp") as link, trio.open_nursery() as nursery:
        assert isinstance(link.address, int)
        ends.port = link.address
        accepted = 0
        all_pending = trio.Event()

        async def counting() -> trio.abc.Stream:
            nonlocal accepted
            stream = await link.accept()
            accepted += 1
            if accepted == bound:
                all_pending.set()
            return stream

        options = {
            "channels": channels,
            "max_pending_handshakes": bound,
            "handshake_timeout": 60,  # never: the test closes the silent ones itself
        }
        nursery.start_soon(lambda: run_destination(ends.wrap_accept(counting), run, **options))
        flood = [await ends.raw() for _ in range(bound)]
        ports = [s.socket.getsockname()[1] for s in flood]  # type: ignore[attr-defined]
        with trio.fail_after(CLOSE_TIMEOUT):
            await all_pending.wait()  # every one accepted: the pending handshakes are full
        connect = ends.wrap_connect(link.connect)
        with trio.fail_after(30):
            async with open_source([RAMBlock("ram", memory)], connect, channels=channels) as src:
                await src.complete()
        drops = [line for line in refusals(caplog) if ": LimitExceeded: dropped, " in line]
        # one drop per connection of the source that came while the bound was reached (each
        # is identified at once, making room), the oldest silent ones first
        assert 1 <= len(drops) <= channels + 1, drops
        assert drops == [
            f"refused a connection from {HOST}:{port}: LimitExceeded: dropped, the oldest of "
            f"{bound} pending handshakes (the most allowed: max_pending_handshakes), when "
            "another connection came"
            for port in ports[: len(drops)]
        ]
        for stream in flood[: len(drops)]:
            await until_closed(stream)  # the destination closed them
        for stream in flood[len(drops) :]:
            await stream.aclose()  # the rest: refused as they close
        with trio.fail_after(30):
            await run.done.wait()
    assert run.error is None, run.error
    assert run.stats is not None and run.stats.status == "completed"
    assert run.blocks["ram"].host.tobytes() == bytes(memory)
    lines = refusals(caplog)
    assert len(lines) == bound and run.stats.refused_connections == bound, lines
    closing = TLS_FAILED if ends.tls else "ChannelClosed: closed by peer before its first"
    assert all(closing in line for line in lines[len(drops) :]), lines


def test_the_bound_is_an_option() -> None:
    assert DestinationOptions().max_pending_handshakes == 32
    with pytest.raises(ConfigError, match="max_pending_handshakes must be >= 1, not 0"):
        DestinationOptions(max_pending_handshakes=0)


# --- the command ----------------------------------------------------------------------------


def test_cli_send_recv_amid_junk(pki: PKI, tmp_path: Path) -> None:
    """Junk thrown at a ``multifd recv`` before its ``multifd send``: both exit 0, the files
    verify, and recv printed one warning line per junk connection, escaped."""
    files = random_files(tmp_path / "in", {"a.bin": 1 << 20, "b.bin": 5 * PS}, 3)
    uuid = str(uuidlib.UUID(bytes=UUID))
    with receiver(tmp_path / "ready", tmp_path / "out", "--uuid", uuid) as (recv, port):
        ends = Ends("plain", pki, port)
        thrown = [connect_close, garbage, tls_client_at_plain, other_uuid, truncated_init]

        async def throw() -> None:
            async with trio.open_nursery() as nursery:
                for act in thrown:
                    nursery.start_soon(act, ends)

        trio.run(throw)
        sent = run("send", "--connect", f"{HOST}:{port}", "--uuid", uuid, *map(str, files))
        assert sent.rc == 0, sent.err
        received = finish(recv)
    assert received.rc == 0, received.err
    for f in files:
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()
    lines = received.err.splitlines()
    assert len(lines) == len(thrown), received.err
    for line in lines:
        assert line.startswith(f"multifd recv: warning: refused a connection from {HOST}:")
        assert line.isprintable(), line
    for said in ("ChannelClosed: closed by peer before", "starts with 47455420", "the peer uses "
                 "TLS", f"uuid {uuidlib.UUID(bytes=OTHER)} does not match {uuid}",
                 "in the middle of its init packet"):  # fmt: skip
        assert sum(said in line for line in lines) == 1, (said, lines)
