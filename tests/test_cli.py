"""The ``multifd`` command as a user runs it: real processes, real loopback TCP, no mocks.

Every process is bounded by a timeout and killed by pid when a test leaves it running. ``recv``
listens on port 0 and reports the address it got through ``--ready-file``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import (
    finish,
    one_line_error,
    receiver,
    run,
    run_on_tty,
    spawn,
    warnings_then_error,
)

from multifd_core.testing import random_files

PS = 4096
#: the demo migrates pc.ram of --size and a 256 KiB pc.bios
BIOS = 256 << 10


def sender(port: int, *args: str) -> list[str]:
    return ["send", "--connect", f"127.0.0.1:{port}", *args]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pages(size: int) -> int:
    return -(-size // PS)


# --- input files --------------------------------------------------------------------------


@dataclass
class Inputs:
    big: Path  # 256 MiB: random, zero and half-zero MiB chunks
    small: Path  # 10000 bytes: the last page only partly in the file
    tiny: Path  # 1 byte
    zeros: Path  # 8193 zero bytes: all zero pages, and a partial one
    sums: dict[str, str]

    @property
    def all(self) -> list[Path]:
        return [self.big, self.small, self.tiny, self.zeros]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inputs]:
    d = tmp_path_factory.mktemp("inputs")
    rng = random.Random(20240521)
    half = bytes(PS)
    big = d / "big.bin"
    with open(big, "wb") as f:
        for i in range(256):
            kind = i % 8
            if kind in (3, 6):
                f.write(bytes(1 << 20))
            elif kind == 5:
                f.write(b"".join(rng.randbytes(PS) if j % 2 else half for j in range(256)))
            else:
                f.write(rng.randbytes(1 << 20))
    small = d / "small.bin"
    small.write_bytes(rng.randbytes(10000))
    tiny = d / "tiny.bin"
    tiny.write_bytes(b"\x07")
    zeros = d / "zeros.bin"
    zeros.write_bytes(bytes(2 * PS + 1))
    sums = {p.name: sha256(p) for p in (big, small, tiny, zeros)}
    yield Inputs(big, small, tiny, zeros, sums)
    big.unlink()


def small_files(directory: Path, count: int = 8, size: int = 3 * PS) -> list[Path]:
    """Several one-packet files: their packets go to every channel in turn."""
    return random_files(directory, {f"f{i}": size for i in range(count)}, count)


# --- demo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "rounds"), [(2, None), (1, 1), (4, 1)])
def test_demo_json(channels: int, rounds: int | None) -> None:
    args = ["demo", "--size", "16M", "--channels", str(channels), "--json"]
    if rounds is not None:
        args += ["--rounds", str(rounds)]
    res = run(*args)
    assert res.rc == 0, res.err
    assert len(res.out.strip().splitlines()) == 1, res.out
    out = json.loads(res.out)
    assert out["status"] == "completed"
    assert out["verified"] is True
    assert out["channels"] == channels
    assert len(out["per-channel"]) == channels
    ram = out["ram"]
    expected_pages = ((16 << 20) + BIOS) // PS
    assert ram["total"] == (16 << 20) + BIOS
    assert ram["page-size"] == PS
    if rounds == 1:
        assert ram["normal"] + ram["duplicate"] == expected_pages
    else:  # later rounds send the dirtied pages again
        assert ram["normal"] + ram["duplicate"] > expected_pages
    dst = out["destination"]
    assert dst["status"] == "completed"
    assert dst["role"] == "destination"
    assert (dst["ram"]["normal"], dst["ram"]["duplicate"]) == (ram["normal"], ram["duplicate"])
    assert dst["ram"]["multifd-bytes"] == ram["multifd-bytes"]


def test_demo_human_output() -> None:
    res = run("demo", "--size", "4M", "--channels", "2")
    assert res.rc == 0, res.err
    assert res.out.startswith("demo migration: completed")
    assert "verified" in res.out
    assert "destination equals source" in res.out
    assert res.err == ""  # no progress bar when stderr is not a terminal


# --- send / recv --------------------------------------------------------------------------


def test_send_recv_files(tmp_path: Path, inputs: Inputs) -> None:
    out_dir = tmp_path / "out"
    t0 = time.monotonic()
    with receiver(tmp_path / "ready", out_dir, "--channels", "4", "--json") as (recv, port):
        sent = run(*sender(port, "--channels", "4", "--json", *map(str, inputs.all)))
        received = finish(recv)
    seconds = time.monotonic() - t0
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    assert seconds < 40

    src = json.loads(sent.out)
    assert src["status"] == "completed"
    assert src["channels"] == 4
    sizes = {p.name: p.stat().st_size for p in inputs.all}
    total_pages = sum(pages(s) for s in sizes.values())
    assert src["ram"]["total"] == total_pages * PS
    assert src["ram"]["normal"] + src["ram"]["duplicate"] == total_pages

    dst = json.loads(received.out)
    assert dst["status"] == "completed"
    assert dst["role"] == "destination"
    assert dst["files"] == {name: str(out_dir / name) for name in sizes}
    assert (dst["ram"]["normal"], dst["ram"]["duplicate"]) == (
        src["ram"]["normal"],
        src["ram"]["duplicate"],
    )

    assert sorted(os.listdir(out_dir)) == sorted([*sizes, ".multifd-recv.json"])  # no .part left
    for name, size in sizes.items():
        assert (out_dir / name).stat().st_size == size, name
        assert sha256(out_dir / name) == inputs.sums[name], name
    (out_dir / inputs.big.name).unlink()


def test_send_recv_sparse_file(tmp_path: Path) -> None:
    """A file with holes (SEEK_DATA tells them apart without reading them) arrives whole."""
    src = tmp_path / "sparse.img"
    rng = random.Random(5)
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        for page in (0, 1, 2, 300, 1500, 1501):
            f.seek(page * PS)
            f.write(rng.randbytes(PS))
        f.seek((8 << 20) + 100)  # a tail past the last whole page, after a long hole
        f.write(b"tail")
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "2", "--json") as (recv, port):
        sent = run(*sender(port, "--channels", "2", "--json", str(src)))
        received = finish(recv)
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    ram = json.loads(sent.out)["ram"]
    assert ram["normal"] == 7
    assert ram["duplicate"] == pages(src.stat().st_size) - 7
    assert sha256(out_dir / src.name) == sha256(src)


def test_send_recv_human_output_and_matching_uuid(tmp_path: Path) -> None:
    files = small_files(tmp_path / "in", count=3)
    out_dir = tmp_path / "out"
    uuid = "0b4c1b7e-3a57-4f0d-9c36-1d7e0c1c2a55"
    with receiver(tmp_path / "ready", out_dir, "--uuid", uuid) as (recv, port):
        sent = run(*sender(port, "--uuid", uuid, *map(str, files)))
        received = finish(recv)
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    assert sent.out.startswith("send: completed")
    assert received.out.startswith("recv: completed")
    assert str(out_dir / "f0") in received.out
    for f in files:
        assert (out_dir / f.name).read_bytes() == f.read_bytes()


def test_channel_count_mismatch_fewer_senders(tmp_path: Path, inputs: Inputs) -> None:
    """recv waits for 4 channels, only 2 come: both ends fail and recv leaves nothing behind."""
    out_dir = tmp_path / "out"
    t0 = time.monotonic()
    # recv's --timeout bounds the wait for the missing connections: keep it short
    with receiver(tmp_path / "ready", out_dir, "--channels", "4", timeout=4) as (recv, port):
        with spawn(*sender(port, "--channels", "2", str(inputs.big))) as send:
            received = finish(recv, 20)
            sent = finish(send, 20)
    assert time.monotonic() - t0 < 20
    assert received.rc == 1
    assert "MigrationTimeout" in one_line_error(received, "recv")
    assert sent.rc == 1
    one_line_error(sent, "send")
    assert os.listdir(out_dir) == []


def test_channel_count_mismatch_more_senders(tmp_path: Path) -> None:
    files = small_files(tmp_path / "in")
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "2") as (recv, port):
        with spawn(*sender(port, "--channels", "4", *map(str, files))) as send:
            received = finish(recv, 20)
            finish(send, 20)  # it may or may not notice before it has written everything
    if received.rc == 0:
        wrong = [f.name for f in files if (out_dir / f.name).read_bytes() != f.read_bytes()]
        assert not wrong, f"recv exited 0 but these files differ from the source: {wrong}"
    assert received.rc == 1
    assert "BadChannelId" in one_line_error(received, "recv")
    assert os.listdir(out_dir) == []


def test_uuid_mismatch(tmp_path: Path, inputs: Inputs) -> None:
    """Channels of another uuid are another migration's: recv refuses each with a warning line
    and goes on, until its --timeout, whose error names them; the sender fails too."""
    out_dir = tmp_path / "out"
    x = "11111111-1111-1111-1111-111111111111"
    y = "22222222-2222-2222-2222-222222222222"
    with receiver(tmp_path / "ready", out_dir, "--uuid", x, timeout=3) as (recv, port):
        with spawn(*sender(port, "--uuid", y, str(inputs.big))) as send:
            received = finish(recv, 20)
            sent = finish(send, 20)
    assert received.rc == 1
    warnings, line = warnings_then_error(received.err, "recv")
    assert len(warnings) == 2  # channels 0 and 1; the main channel carries no uuid
    for warning in warnings:
        assert "refused a connection from 127.0.0.1:" in warning
        assert "UuidMismatch: channel " in warning and f"uuid {y} does not match {x}" in warning
    assert "MigrationTimeout: only 1 of 3 connections" in line
    assert "2 other connection(s) refused" in line and y in line and x in line
    assert sent.rc == 1
    one_line_error(sent, "send")
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("received_mib", [0, 8, 48])
def test_sender_killed_mid_transfer(tmp_path: Path, inputs: Inputs, received_mib: int) -> None:
    """kill -9 of the sender once recv's .part file holds ``received_mib`` MiB of the ~176 MiB
    of data: recv fails promptly with one line and removes the .part (even when the error
    still holds views of its mmap)."""
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "4") as (recv, port):
        with spawn(*sender(port, "--channels", "4", str(inputs.big))) as send:
            deadline = time.monotonic() + 10
            while True:
                assert send.poll() is None and recv.poll() is None, "ended before the kill"
                assert time.monotonic() < deadline, f"recv never received {received_mib} MiB"
                with contextlib.suppress(FileNotFoundError):
                    parts = out_dir.glob(".multifd-*.part")  # the receiver's own names
                    if sum(p.stat().st_blocks for p in parts) * 512 >= received_mib << 20:
                        break
                time.sleep(0.001)
            os.kill(send.pid, signal.SIGKILL)
            send.wait(5)
            killed = time.monotonic()
            received = finish(recv, 15)
    assert time.monotonic() - killed < 15
    assert received.rc == 1
    one_line_error(received, "recv")
    assert os.listdir(out_dir) == []


# --- plugins ------------------------------------------------------------------------------


def test_plugins_json() -> None:
    res = run("plugins", "--json")
    assert res.rc == 0, res.err
    out = json.loads(res.out)
    none = [m for m in out["methods"] if m["value"] == 0]
    assert len(none) == 1
    assert none[0]["name"] == "none"
    assert none[0]["flags"] == 0
    assert "multifd-core" in none[0]["distribution"]
    assert isinstance(out["problems"], list)


def test_plugins_plain() -> None:
    res = run("plugins")
    assert res.rc == 0, res.err
    assert any(
        re.match(r"0\s+flags 0x00\s+none\s+multifd-core", line) for line in res.out.splitlines()
    ), res.out


def test_plugins_table_on_a_terminal() -> None:
    """stdout a terminal: a table of the same methods, a row each, within its width."""
    res = run_on_tty("plugins", stream="stdout", columns=100)
    assert res.rc == 0, res.err
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", res.out)  # its bold header
    lines = text.splitlines()
    assert any(re.search(r"value\W+flags\W+name\W+aliases\W+distribution", x) for x in lines)
    assert any(re.search(r"\b0\W+0x00\W+none\W+nocomp\W+multifd-core", x) for x in lines), text
    assert max(len(x) for x in lines) <= 100
    assert len(json.loads(run("plugins", "--json").out)["methods"]) == sum(
        bool(re.match(r"│ \d+ ", x)) for x in lines
    )


# --- errors -------------------------------------------------------------------------------


def test_unknown_compression() -> None:
    res = run("demo", "--size", "1M", "--compression", "nope")
    assert res.rc == 1
    assert "nope" in one_line_error(res, "demo")
    assert res.out == ""


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_send_nothing_listening(dead_port: int, inputs: Inputs) -> None:
    t0 = time.monotonic()
    res = run(*sender(dead_port, str(inputs.small)), timeout=20)
    assert time.monotonic() - t0 < 20
    assert res.rc == 1
    assert f"127.0.0.1:{dead_port}" in one_line_error(res, "send")


def test_send_empty_file(tmp_path: Path, dead_port: int) -> None:
    empty = tmp_path / "empty.bin"
    empty.touch()
    res = run(*sender(dead_port, str(empty)))
    assert res.rc == 1
    assert "empty" in one_line_error(res, "send")


def test_send_missing_file(tmp_path: Path, dead_port: int) -> None:
    res = run(*sender(dead_port, str(tmp_path / "absent.bin")))
    assert res.rc == 1
    assert "absent.bin" in one_line_error(res, "send")


def test_bad_size() -> None:
    res = run("demo", "--size", "12Q")
    assert res.rc == 2
    assert "bad size '12Q'" in res.err
    assert res.out == ""


# --- limits and the plugin allow-list -----------------------------------------------------


def test_plugins_allow_list() -> None:
    res = run("plugins", "--json", "--allow-method", "zstd")
    assert res.rc == 0, res.err
    assert [m["name"] for m in json.loads(res.out)["methods"]] == ["zstd"]


def test_compression_outside_allow_list_is_refused(tmp_path: Path) -> None:
    res = run(
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--output",
        str(tmp_path),
        "--compression",
        "zlib",
        "--allow-method",
        "none",
        "--allow-method",
        "zstd",
    )
    assert res.rc == 1
    line = one_line_error(res, "recv")
    assert "--compression zlib is not among --allow-method none, zstd" in line


def test_recv_max_size(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    data = tmp_path / "two-mib.img"
    data.write_bytes(os.urandom(2 << 20))
    with receiver(tmp_path / "ready", out_dir, "--max-size", "1M") as (recv, port):
        with spawn(*sender(port, str(data))) as send:
            received = finish(recv, 20)
            sent = finish(send, 20)
    assert received.rc == 1
    line = one_line_error(received, "recv")
    assert "LimitExceeded" in line and "more than the 1048576 allowed" in line
    # the return path (send's default): recv's SHUT says it failed, even when everything fit
    # in the socket buffers
    assert sent.rc == 1
    assert "DestinationFailed" in one_line_error(sent, "send")
    assert os.listdir(out_dir) == []


def test_recv_idle_timeout(tmp_path: Path) -> None:
    """A sender that connects every channel and then says nothing more: recv gives up after its
    --idle-timeout with ChannelStalled, well before its connect --timeout."""
    from multifd_core.mainstream import MainStreamWriter
    from multifd_core.wire import MultiFDInit

    w = MainStreamWriter()
    w.header()
    w.ram_setup([("disk.img", 1 << 20)])
    with receiver(tmp_path / "ready", tmp_path / "out", "--idle-timeout", "0.5") as (recv, port):
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            socks[0].sendall(w.take())
            for cid, s in enumerate(socks[1:]):
                s.sendall(MultiFDInit(cid, bytes(16)).encode())
            start = time.monotonic()
            received = finish(recv, 20)
            took = time.monotonic() - start
        finally:
            for s in socks:
                s.close()
    assert received.rc == 1
    line = one_line_error(received, "recv")
    assert "ChannelStalled" in line and "idle timeout 0.5 s" in line
    assert took < 8
