"""What ``multifd`` prints never carries raw control characters from the peer.

The helper ``shown`` (examples and a hypothesis property: always printable, one line, printable
text unchanged); the summary, the one-line error, the library's warnings and ``--json``, in
process. End to end (about 1 s each, real loopback TCP): a library source whose block name and
machine type hold escape sequences, newlines and bidi controls into ``multifd qemu-save``,
human and ``--json``; ``multifd send`` of a file whose name holds them fails on one line.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from procs import MULTIFD, TIMEOUT, finish, run

from multifd_core import (
    ChannelClosed,
    ConfigError,
    MigrationStats,
    RAMBlock,
    migrate,
    tcp_connector,
)
from multifd_core.cli.output import failed, logged_to_stderr, print_json, shown, summary

EVIL_NAME = "pc.ram\x1b[2J\x1b]0;owned\x07\n\rfake line\u202eevil\x01\x7f\x85"
EVIL_MACHINE = "pc-q35-7.2\x1b[31m\nmultifd: done\u2066"

# --- the helper -----------------------------------------------------------------------------

EXAMPLES = {
    "pc.ram": "pc.ram",
    "été 日本語 🙂 a\\b 'q' \"d\"": "été 日本語 🙂 a\\b 'q' \"d\"",  # printable: as is
    "\x1b[2J": "\\x1b[2J",
    "a\nb": "a\\nb",
    "a\rb": "a\\rb",
    "tab\t": "tab\\t",
    "\x00\x7f": "\\x00\\x7f",
    "c1\x85\x9b": "c1\\x85\\x9b",
    "\u202eevil": "\\u202eevil",  # RIGHT-TO-LEFT OVERRIDE
    "\u2066\u2069": "\\u2066\\u2069",  # isolates
    "zero\u200bwidth": "zero\\u200bwidth",
    "\u2028\u2029": "\\u2028\\u2029",  # line and paragraph separators
    "bad\udcffbyte": "bad\\udcffbyte",  # surrogateescape of an undecodable byte
    "\U000e0041": "\\U000e0041",  # a tag character
    repr("x\x1by"): repr("x\x1by"),  # a repr passes unchanged
}


@pytest.mark.parametrize(("text", "want"), EXAMPLES.items())
def test_shown_examples(text: str, want: str) -> None:
    assert shown(text) == want


@given(st.text())
def test_shown_is_printable_and_one_line(text: str) -> None:
    out = shown(text)
    assert out.isprintable()
    assert len(out.splitlines()) <= 1
    out.encode("utf-8")  # no lone surrogate left: printing it cannot fail
    if text.isprintable():
        assert out == text


# --- where the command prints ---------------------------------------------------------------


def test_summary_escapes_every_line() -> None:
    text = summary(
        "recv",
        MigrationStats("destination", 2, "none", 4096),
        {"files": EVIL_NAME, "machine": EVIL_MACHINE},
    )
    lines = text.split("\n")
    assert len(lines) == 10  # title, 7 lines of stats, the 2 extra, none more
    assert all(line.isprintable() for line in lines)
    assert f"  files             {shown(EVIL_NAME)}" in lines
    assert f"  machine           {shown(EVIL_MACHINE)}" in lines


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError(f"block {EVIL_NAME}: raw in the message"),
        ChannelClosed(f"closed by peer after {EVIL_NAME}", channel=3),
        OSError(28, "No space left on device", f"/out/{EVIL_NAME}"),
    ],
)
def test_error_is_one_escaped_line(exc: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    assert failed("recv", exc) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err.removesuffix("\n")
    assert "\n" not in line and line.isprintable(), captured.err
    assert line.startswith("multifd recv: error: ")
    assert "\\x1b[2J" in line


def test_library_warnings_are_escaped_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("multifd_core.destination")
    with logged_to_stderr("recv"):
        log.warning("a connection sent %s", EVIL_NAME)
        log.info("not shown: below warning")
    log.warning("after the command: no longer ours")
    err = capsys.readouterr().err
    assert err == f"multifd recv: warning: a connection sent {shown(EVIL_NAME)}\n"


def test_json_escapes_controls(capsys: pytest.CaptureFixture[str]) -> None:
    value = {"name": EVIL_NAME, "machine-type": EVIL_MACHINE, "file": "bad\udcffbyte"}
    print_json(value)
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert out.isascii() and out[:-1].isprintable()
    assert json.loads(out) == value


# --- end to end -----------------------------------------------------------------------------


Started = Callable[..., tuple[subprocess.Popen[str], int]]


@pytest.fixture
def qemu_save(tmp_path: Path) -> Iterator[Started]:
    """``multifd qemu-save`` listening on loopback (``--json`` when the test asks)."""
    ready = tmp_path / "ready"

    def start(*extra: str) -> tuple[subprocess.Popen[str], int]:
        args = ["qemu-save", "--listen", "127.0.0.1:0", "--output", str(tmp_path / "snap")]
        proc = subprocess.Popen(
            [*MULTIFD, *args, "--ready-file", str(ready), "--timeout", "10", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        deadline = time.monotonic() + TIMEOUT
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None, finish(proc).err
            assert time.monotonic() < deadline, "qemu-save never listened"
            time.sleep(0.01)
        return proc, ast.literal_eval(ready.read_text())[1]

    started: list[subprocess.Popen[str]] = []
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def send_evil(port: int) -> None:
    block = RAMBlock(EVIL_NAME, bytearray(os.urandom(8 * 4096)))

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            await migrate([block], tcp_connector("127.0.0.1", port), machine_type=EVIL_MACHINE)

    trio.run(main)


def test_qemu_save_summary_shows_peer_names_escaped(qemu_save: Started) -> None:
    proc, port = qemu_save()
    send_evil(port)
    res = finish(proc)
    assert res.rc == 0, res.err
    assert res.err == ""
    lines = res.out.splitlines()
    assert all(line.isprintable() for line in lines), res.out
    assert f"  machine           {shown(EVIL_MACHINE)}" in lines
    assert f"  blocks            {shown(EVIL_NAME)}" in lines
    assert "\\x1b[2J\\x1b]0;owned\\x07\\n\\rfake line\\u202eevil" in res.out


def test_qemu_save_json_keeps_names_exact(qemu_save: Started) -> None:
    proc, port = qemu_save("--json")
    send_evil(port)
    res = finish(proc)
    assert res.rc == 0, res.err
    assert res.out.count("\n") == 1 and res.out.isascii()
    out = json.loads(res.out)
    assert out["machine-type"] == EVIL_MACHINE
    assert [b["name"] for b in out["blocks"]] == [EVIL_NAME]


def test_send_error_names_the_file_on_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "empty\x1b[2J\nline\u202e"
    bad.write_bytes(b"")
    res = run("send", "--connect", "127.0.0.1:9", str(bad))
    assert res.rc == 1
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].isprintable()
    assert lines[0].startswith("multifd send: error: ConfigError: ")
    assert "empty\\x1b[2J\\nline\\u202e" in lines[0]
