"""A unix-socket listener cleans up after itself and replaces only what is stale.

Real unix sockets throughout. The library (``open_unix_acceptor``, a few ms each): closing
removes the socket file, but not a file that replaced it; a stale socket file (nobody listens:
a connect is refused) is replaced; a live listener's path, a regular file, a symlink and a
directory are refused with one ConfigError and left untouched. The command (real processes,
about 1 s each): ``multifd recv --listen unix:PATH`` after a finished run and after a SIGKILLed
one starts fine; recv on a live listener's path fails with one line and leaves it listening,
and when that listener is a ``multifd recv`` in the middle of a migration, recv's probe is a
junk connection to it (one warning line) and its migration completes; a regular file at the
path is refused and left as it was.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from procs import TIMEOUT, Result, finish, run, spawn

from multifd_core import (
    ConfigError,
    open_source,
    open_unix_acceptor,
    tls_acceptor,
    unix_connector,
)
from multifd_core.files import FileBlock, block_name_for, files_description

# --- the library ----------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="mfd-", dir="/tmp") as d:
        yield Path(d)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a listener killed by SIGKILL leaves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    sock.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)


async def one_connection(path: Path) -> None:
    """A client connects to ``path`` and an acceptor there takes the connection."""
    async with await open_unix_acceptor(path) as accept:
        client = await unix_connector(path)()
        server = await accept()
        await client.send_all(b"x")
        assert await server.receive_some(1) == b"x"
        await client.aclose()
        await server.aclose()


async def test_close_removes_the_socket_file(short_dir: Path) -> None:
    path = short_dir / "s"
    await one_connection(path)
    assert not os.path.lexists(path)
    await one_connection(path)  # and the next listener starts there
    assert not os.path.lexists(path)


async def test_close_leaves_a_file_that_replaced_the_socket(short_dir: Path) -> None:
    path = short_dir / "s"
    accept = await open_unix_acceptor(path)
    os.unlink(path)
    stale_socket(path)  # someone else's socket file now
    theirs = path.lstat().st_ino
    await accept.aclose()
    assert path.lstat().st_ino == theirs
    os.unlink(path)
    accept = await open_unix_acceptor(path)
    os.unlink(path)
    path.write_text("mine")
    await accept.aclose()
    await accept.aclose()  # twice: still nothing removed, no error
    assert path.read_text() == "mine"


async def test_tls_around_it_removes_the_socket_file_too(short_dir: Path) -> None:
    """recv and qemu-save with --tls wrap the unix acceptor: closing that closes it."""
    path = short_dir / "s"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    async with tls_acceptor(await open_unix_acceptor(path), context) as accept:
        assert accept.address == str(path)
        assert stat.S_ISSOCK(path.lstat().st_mode)
    assert not os.path.lexists(path)


async def test_stale_socket_file_is_replaced(short_dir: Path) -> None:
    path = short_dir / "s"
    stale_socket(path)
    await one_connection(path)
    assert not os.path.lexists(path)


async def test_live_listener_is_refused(short_dir: Path) -> None:
    path = short_dir / "s"
    async with await open_unix_acceptor(path) as first:
        before = path.lstat()
        with pytest.raises(ConfigError, match="another process listens on it") as err:
            await open_unix_acceptor(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert path.lstat().st_ino == before.st_ino
        client = await unix_connector(path)()  # the first listener still works
        server = await first()
        await client.aclose()
        await server.aclose()
    assert not os.path.lexists(path)


async def test_full_backlog_counts_as_live(short_dir: Path) -> None:
    """A listener whose backlog is full (a non-blocking connect: EAGAIN) is still live."""
    path = short_dir / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(0)
        waiting = []
        for _ in range(4):  # fill the backlog of 0 (+1): later connects get EAGAIN
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            waiting.append(c)
            if c.connect_ex(str(path)) != 0:
                break
        try:
            with pytest.raises(ConfigError, match="another process listens on it"):
                await open_unix_acceptor(path)
        finally:
            for c in waiting:
                c.close()
        assert stat.S_ISSOCK(path.lstat().st_mode)


@pytest.mark.parametrize("kind", ["regular file", "symlink to a socket", "directory"])
async def test_not_a_socket_is_refused_and_left_alone(short_dir: Path, kind: str) -> None:
    path = short_dir / "s"
    target = short_dir / "target.sock"
    if kind == "regular file":
        path.write_bytes(b"user data\n")
    elif kind == "directory":
        path.mkdir()
    else:
        stale_socket(target)
        path.symlink_to(target)
    before = path.lstat()
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await open_unix_acceptor(path)
    after = path.lstat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    if kind == "regular file":
        assert path.read_bytes() == b"user data\n"
    if kind == "symlink to a socket":
        assert stat.S_ISSOCK(target.lstat().st_mode)


async def test_bind_failure_is_one_config_error(short_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot listen on unix socket"):
        await open_unix_acceptor(short_dir / "missing-dir" / "s")
    with pytest.raises(ConfigError, match="cannot listen on unix socket"):
        await open_unix_acceptor(short_dir / ("x" * 120))  # longer than sun_path holds


async def test_abstract_socket_has_no_file(short_dir: Path) -> None:
    name = f"\0multifd-test-{os.getpid()}"
    async with await open_unix_acceptor(name) as accept:
        client = await unix_connector(name)()
        server = await accept()
        await client.aclose()
        await server.aclose()
    with trio.fail_after(5):  # the name is free again at once
        async with await open_unix_acceptor(name):
            pass


# --- the command ----------------------------------------------------------------------------


def wait_listening(proc: subprocess.Popen[str], ready: Path) -> None:
    """Until recv has written its ready file (it listens by then); fails if it exits first."""
    deadline = time.monotonic() + TIMEOUT
    while not (ready.exists() and ready.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"recv exited {proc.returncode} first: {finish(proc).err}")
        assert time.monotonic() < deadline, "recv never listened"
        time.sleep(0.01)
    ready.unlink()


def recv_args(sock: Path, out: Path, ready: Path) -> list[str]:
    return ["recv", "--listen", f"unix:{sock}", "--output", str(out), "--ready-file", str(ready)]


def migrate_once(d: Path, sock: Path, name: str) -> None:
    """A whole ``send`` into ``recv`` over ``sock``; both exit 0, the file arrives."""
    src = d / name
    src.write_bytes(os.urandom(3 * 4096))
    out = d / f"out-{name}"
    with spawn(*recv_args(sock, out, d / "ready")) as recv:
        wait_listening(recv, d / "ready")
        sent = run("send", "--connect", f"unix:{sock}", str(src))
        received = finish(recv)
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    assert (out / name).read_bytes() == src.read_bytes()


def test_recv_after_finished_and_killed_runs(short_dir: Path) -> None:
    sock = short_dir / "m.sock"
    migrate_once(short_dir, sock, "a")
    assert not os.path.lexists(sock)  # the finished run removed its socket file
    with spawn(*recv_args(sock, short_dir / "out-k", short_dir / "ready")) as recv:
        wait_listening(recv, short_dir / "ready")
        os.kill(recv.pid, signal.SIGKILL)
        recv.wait(TIMEOUT)
    assert stat.S_ISSOCK(sock.lstat().st_mode)  # SIGKILL left it behind: stale
    migrate_once(short_dir, sock, "b")
    assert not os.path.lexists(sock)


def test_recv_refuses_a_live_listeners_path(short_dir: Path) -> None:
    """The live listener is a plain socket here: a live ``multifd recv`` would see recv's
    probe as a connection that never sends a handshake (issue 13's junk connections)."""
    sock = short_dir / "m.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(8)
        before = sock.lstat()
        res = run(*recv_args(sock, short_dir / "out", short_dir / "ready"))
        assert res.rc == 1
        lines = res.err.strip().splitlines()
        assert len(lines) == 1, res.err
        assert lines[0].startswith("multifd recv: error: ConfigError: cannot listen on unix")
        assert "another process listens on it" in lines[0]
        assert sock.lstat().st_ino == before.st_ino
        live.settimeout(TIMEOUT)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(sock))  # still the live one's
            conn, _ = live.accept()
            conn.close()
    assert not (short_dir / "out").exists() or not os.listdir(short_dir / "out")


def second_recv(sock: Path, d: Path) -> tuple[int, Result]:
    """Another ``multifd recv`` on ``sock``, run to its end: its pid and result."""
    with spawn(*recv_args(sock, d / "out-second", d / "ready-second")) as proc:
        return proc.pid, finish(proc)


async def test_recv_on_a_live_recvs_path_leaves_its_migration(short_dir: Path) -> None:
    """A second recv on the path of a recv in the middle of a migration: its probe (a connect
    and close) is junk to the live one, which warns once and completes its migration; the
    second fails with one clear line."""
    sock = short_dir / "m.sock"
    data = short_dir / "a.bin"
    data.write_bytes(os.urandom(64 * 4096))
    out = short_dir / "out"
    with spawn(*recv_args(sock, out, short_dir / "ready")) as live:
        wait_listening(live, short_dir / "ready")
        block = FileBlock(block_name_for(data), data)
        try:
            described = files_description([block])
            async with open_source([block], unix_connector(sock), description=described) as src:
                await src.send_round()  # the migration runs: connected, a round sent
                pid, second = await trio.to_thread.run_sync(second_recv, sock, short_dir)
                await src.complete()
        finally:
            block.close()
        received = await trio.to_thread.run_sync(finish, live)
    assert second.rc == 1
    [line] = second.err.splitlines()
    assert line.startswith("multifd recv: error: ConfigError: cannot listen on unix socket")
    assert line.endswith("another process listens on it"), line
    assert received.rc == 0, received.err
    assert (out / "a.bin").read_bytes() == data.read_bytes()
    [warning] = received.err.splitlines()
    assert re.fullmatch(
        rf"multifd recv: warning: refused a connection from pid {pid} uid \d+: "
        "ChannelClosed: closed by peer before its first message",
        warning,
    ), warning
    assert not os.path.lexists(sock)


def test_recv_refuses_a_regular_file(short_dir: Path) -> None:
    sock = short_dir / "m.sock"
    sock.write_bytes(b"not a socket\n")
    before = sock.stat()
    res = run(*recv_args(sock, short_dir / "out", short_dir / "ready"))
    assert res.rc == 1
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert "ConfigError" in lines[0] and "exists and is not a socket" in lines[0]
    assert sock.read_bytes() == b"not a socket\n"
    assert sock.stat().st_mtime_ns == before.st_mtime_ns
