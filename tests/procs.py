"""Running the ``multifd`` command in tests: start it, bound it, kill it by pid, read its ready
file. Shared by the CLI tests (test_cli, test_tls, test_netns)."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

_script = shutil.which("multifd", path=os.path.dirname(sys.executable))
MULTIFD = [_script] if _script else [sys.executable, "-m", "multifd_core.cli"]
#: seconds any one command may take before the test fails (and kills it)
TIMEOUT = 30


class Result(NamedTuple):
    rc: int
    out: str
    err: str


@contextmanager
def spawn(*args: str) -> Iterator[subprocess.Popen[str]]:
    """Start ``multifd ARGS``; kill it by pid if it is still running when the block ends."""
    proc = subprocess.Popen(
        [*MULTIFD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with proc:  # closes the pipes and reaps the process
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)


def finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> Result:
    """Wait (at most ``timeout`` s) for ``proc`` to exit; its return code and output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args!r} still running after {timeout} s")
    return Result(proc.returncode, out, err)


def run(*args: str, timeout: float = TIMEOUT) -> Result:
    """Run ``multifd ARGS`` to its end (at most ``timeout`` s)."""
    with spawn(*args) as proc:
        return finish(proc, timeout)


def warnings_then_error(err: str, command: str) -> tuple[list[str], str]:
    """A failed command's stderr: its warnings (one line each, e.g. a refused connection), then
    exactly one error line, nothing else (no traceback). Returns both."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"multifd {command}: error: "), err
    assert all(line.startswith(f"multifd {command}: warning: ") for line in lines[:-1]), err
    return lines[:-1], lines[-1]


def wait_ready_file(
    proc: subprocess.Popen[str], ready: Path, timeout: float = TIMEOUT
) -> tuple[str, int]:
    """The ``(host, port)`` a ``multifd recv --ready-file ready`` listens on, once written;
    fails the test if ``proc`` exits first or nothing comes within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            host, port = ast.literal_eval(ready.read_text())
            return host, port
        except (OSError, ValueError, SyntaxError):  # not there yet, or half written
            pass
        if proc.poll() is not None:
            pytest.fail(f"recv exited {proc.returncode} before listening: {finish(proc).err}")
        if time.monotonic() > deadline:
            pytest.fail("recv did not write its ready file")
        time.sleep(0.01)


@contextmanager
def receiver(
    ready: Path, out_dir: Path, *args: str, timeout: float = 10, host: str = "127.0.0.1"
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``multifd recv`` on ``host``:0 (``--timeout timeout``); yields the process and the port
    it listens on."""
    listen = ["--listen", f"{host}:0", "--output", str(out_dir), "--ready-file", str(ready)]
    with spawn("recv", *listen, "--timeout", str(timeout), *args) as proc:
        got, port = wait_ready_file(proc, ready)
        assert got == host
        yield proc, port
