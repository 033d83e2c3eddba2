"""Running the ``multifd`` command in tests: start it, bound it, kill it by pid, read its ready
file, or run it on a pseudo-terminal. Shared by the CLI tests (test_cli, test_tls, test_netns,
test_progress_bar, test_integrity, test_method_errors)."""

from __future__ import annotations

import ast
import fcntl
import os
import pty
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

_script = shutil.which("multifd", path=os.path.dirname(sys.executable))
MULTIFD = [_script] if _script else [sys.executable, "-m", "multifd_core.cli"]
#: seconds any one command may take before the test fails (and kills it)
TIMEOUT = 30


class Result(NamedTuple):
    rc: int
    out: str
    err: str


def write_dist_info(root: Path, dist_name: str, entry_points: Mapping[str, str]) -> None:
    """A fake installed distribution in ``root``: its metadata and ``multifd`` entry points."""
    info = root / f"{dist_name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[multifd]\n{lines}")


def plugin_site(root: Path, module: str) -> dict[str, str]:
    """Install the plugin module ``module`` (importable from this directory) as a distribution
    in ``root`` for ``multifd`` subprocesses: the environment that makes them load it."""
    write_dist_info(root, module.replace("_", "-"), {module: module})
    here = str(Path(__file__).parent)
    path = os.pathsep.join([str(root), here, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


@contextmanager
def spawn(*args: str, env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Start ``multifd ARGS`` (in ``env``, default this process's environment); kill it by pid
    if it is still running when the block ends."""
    proc = subprocess.Popen(
        [*MULTIFD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
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


def run(*args: str, timeout: float = TIMEOUT, env: Mapping[str, str] | None = None) -> Result:
    """Run ``multifd ARGS`` to its end (at most ``timeout`` s)."""
    with spawn(*args, env=env) as proc:
        return finish(proc, timeout)


def run_on_tty(
    *args: str, timeout: float = TIMEOUT, columns: int = 100, stream: str = "stderr"
) -> Result:
    """Run ``multifd ARGS`` with its ``stream`` ("stderr" or "stdout") on a pseudo-terminal
    ``columns`` wide (as in a terminal window), the other one a pipe (for a command that
    prints little there); that stream's field of the result is all it wrote to the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    pipe = subprocess.PIPE
    outputs = (slave, pipe) if stream == "stdout" else (pipe, slave)
    try:
        proc = subprocess.Popen(
            [*MULTIFD, *args], stdin=subprocess.DEVNULL, stdout=outputs[0], stderr=outputs[1]
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        with proc:
            try:
                while time.monotonic() < deadline:
                    if not select.select([master], [], [], deadline - time.monotonic())[0]:
                        continue
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: the terminal's last writer closed it
                        break
                    if not data:
                        break
                    chunks.append(data)
                else:
                    pytest.fail(f"multifd {' '.join(args)} still running after {timeout} s")
                piped = proc.stderr if stream == "stdout" else proc.stdout
                assert piped is not None
                other = piped.read().decode()  # the terminal closed: the process is exiting
                rc = proc.wait(timeout)
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
    finally:
        os.close(master)
    shown = b"".join(chunks).decode()
    return Result(rc, shown, other) if stream == "stdout" else Result(rc, other, shown)


def one_line_error(res: Any, command: str) -> str:
    """``res`` (anything with the process's ``err``) failed with exactly one line on stderr,
    ``multifd COMMAND: error: ...`` (no traceback); returns it."""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith(f"multifd {command}: error: "), res.err
    return lines[0]


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
    ready: Path,
    out_dir: Path,
    *args: str,
    timeout: float = 10,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``multifd recv`` on ``host``:0 (``--timeout timeout``); yields the process and the port
    it listens on."""
    listen = ["--listen", f"{host}:0", "--output", str(out_dir), "--ready-file", str(ready)]
    with spawn("recv", *listen, "--timeout", str(timeout), *args, env=env) as proc:
        got, port = wait_ready_file(proc, ready)
        assert got == host
        yield proc, port


def cli_pair(
    tmp_path: Path, send_args: list[str], recv_args: list[str], plugin: str = "broken_methods"
) -> tuple[int, str, int, str, Path, bytes]:
    """``multifd send FILE`` (3 MiB of random bytes) into ``multifd recv`` with the plugin
    module ``plugin`` installed (``plugin_site``): each one's exit status and stderr, the output
    directory and the file's content."""
    tmp_path.mkdir(exist_ok=True)
    env = plugin_site(tmp_path / "site", plugin)
    data = random.Random(3).randbytes(3 << 20)
    src = tmp_path / "disk.img"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    with receiver(tmp_path / "ready", out, *recv_args, env=env) as (proc, port):
        sent = run("send", "--connect", f"127.0.0.1:{port}", *send_args, str(src), env=env)
        got = finish(proc)
    return sent.rc, sent.err, got.rc, got.err, out, data
