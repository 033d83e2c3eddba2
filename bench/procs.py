"""Child processes for the benchmark: started, timed, reaped with their rusage, always killed.

Every child is reaped with ``os.wait4`` so that its own CPU time and peak RSS (``ru_maxrss``, KiB)
are known. Waits are bounded: a pidfd (or a short poll where pidfds are missing) with a deadline.
``Children`` keeps every process started; its ``close()`` (call it in a ``finally``) sends SIGTERM
to the ones still running, then SIGKILL to those that did not exit, each by its own pid.
"""

from __future__ import annotations

import ast
import ctypes
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the benchmark itself dies (Linux)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class BenchError(Exception):
    """A run that could not be measured (a child failed, a wait timed out, ...)."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    started: float
    stderr_path: Path | None = None
    ended: float | None = None
    status: int | None = None  # exit code, or -signal
    rusage: Any = None
    pidfd: int | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def cpu_seconds(self) -> float:
        return float(self.rusage.ru_utime + self.rusage.ru_stime) if self.rusage else 0.0

    @property
    def user_seconds(self) -> float:
        return float(self.rusage.ru_utime) if self.rusage else 0.0

    @property
    def sys_seconds(self) -> float:
        return float(self.rusage.ru_stime) if self.rusage else 0.0

    @property
    def max_rss_bytes(self) -> int:
        return int(self.rusage.ru_maxrss) * 1024 if self.rusage else 0

    def try_reap(self) -> bool:
        """Reap the child if it has exited (never blocks)."""
        if self.status is not None:
            return True
        try:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: no rusage to report
            self._finish(-255, None)
            return True
        if pid == 0:
            return False
        self._finish(os.waitstatus_to_exitcode(status), rusage)
        return True

    def _finish(self, status: int, rusage: Any) -> None:
        self.ended = time.monotonic()
        self.status = status
        self.rusage = rusage
        self.popen.returncode = status  # keep subprocess from waiting on a reaped pid
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def stderr_tail(self, limit: int = 600) -> str:
        if self.stderr_path is None:
            return ""
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-limit:]

    def describe_failure(self) -> str:
        tail = self.stderr_tail()
        status = self.status if self.status is not None else 0
        how = f"exit status {status}" if status >= 0 else f"signal {-status}"
        return f"{self.name} failed ({how})" + (f": {tail}" if tail else "")


class Children:
    """Every process the benchmark starts; ``close()`` ends those still running."""

    def __init__(self) -> None:
        self.all: list[Child] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: Path | int | None = subprocess.DEVNULL,
        stderr: Path | None = None,
        cwd: Path | None = None,
    ) -> Child:
        out: IO[bytes] | int | None
        opened: list[IO[bytes]] = []
        if isinstance(stdout, Path):
            out = open(stdout, "wb")  # closed right after the spawn
            opened.append(out)
        else:
            out = stdout
        err: IO[bytes] | int
        if stderr is not None:
            err = open(stderr, "wb")
            opened.append(err)
        else:
            err = subprocess.DEVNULL
        started = time.monotonic()
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                preexec_fn=_die_with_parent,  # no threads here: safe
            )
        except FileNotFoundError as exc:
            raise BenchError(f"cannot start {name}: {exc}") from None
        finally:
            for f in opened:
                f.close()
        child = Child(name, popen, started, stderr)
        try:
            child.pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            child.pidfd = None
        self.all.append(child)
        return child

    def wait(self, children: Sequence[Child], timeout: float) -> None:
        """Wait until every child of ``children`` has exited; BenchError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [c for c in children if not c.try_reap()]
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(c.name for c in pending)
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {names}")
            fds = [c.pidfd for c in pending if c.pidfd is not None]
            if len(fds) == len(pending):
                select.select(fds, [], [], min(left, 1.0))
            else:
                time.sleep(min(left, 0.002))

    def end(self, child: Child, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; bounded; reaps the child."""
        if child.try_reap():
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.wait([child], wait)
                return
            except BenchError:
                continue

    def close(self) -> None:
        for child in self.all:
            try:
                self.end(child)
            except Exception:  # best effort: keep ending the others
                pass
        self.all = [c for c in self.all if not c.done]


def wait_for_ready_file(path: Path, child: Child, timeout: float) -> tuple[str, int]:
    """The address a ``multifd ... --ready-file`` wrote: ``('127.0.0.1', PORT)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.try_reap():
            raise BenchError(child.describe_failure() + " before it listened")
        try:
            text = path.read_text()
            host, port = ast.literal_eval(text)
            return str(host), int(port)
        except (OSError, ValueError, SyntaxError, TypeError):
            time.sleep(0.005)
    raise BenchError(f"{child.name} did not write {path} within {timeout:.0f} s")


def free_port() -> int:
    """A TCP port free on loopback right now (for tools that cannot listen on port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for_listen(port: int, child: Child, timeout: float) -> None:
    """Wait until some socket listens on ``port`` (without connecting to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.try_reap():
            raise BenchError(child.describe_failure() + " before it listened")
        if port in _listening_ports():
            return
        time.sleep(0.01)
    raise BenchError(f"{child.name} did not listen on port {port} within {timeout:.0f} s")
