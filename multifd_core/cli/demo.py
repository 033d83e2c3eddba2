"""``multifd demo``: migrate a generated VM-like image over loopback to a destination in a child
process (demodst.py), and check the destination's copy.

The two ends run in two processes, as ``send`` and ``recv`` do, so the figure is the engine's
between two processes, not two ends sharing one event loop. The child receives into memory with
the demo's own options and reports its stats and the XXH3-128 digest of each block as it landed;
the demo compares them with its own blocks' digests (``verified``). The child is bounded by
timeouts and, on every way out of the demo (an error, a timeout, Ctrl-C), terminated by its pid
(SIGTERM, then SIGKILL); it ends by itself when the demo's end of its stdin closes, so a demo
killed outright does not leave it behind (not PR_SET_PDEATHSIG: trio starts a process from a
worker thread, and that thread's exit would signal it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .. import open_source
from ..errors import ChannelError, ConfigError, DestinationFailed, IncompleteMigration
from ..image import dirty_some_pages, vm_like_image
from ..integrity import digest_blocks
from ..ram import RAMBlock
from ..source import Source
from ..transport import tcp_connector
from .bar import ProgressBar
from .demodst import MAX_MESSAGE
from .ends import destination_options, source_options
from .output import human, shown, summary

#: Seconds the destination process may take to start and listen.
START_TIMEOUT = 30.0
#: Seconds it may take to report once the source is done (drain, digests), plus one per
#: DIGEST_RATE bytes of RAM.
REPORT_TIMEOUT = 60.0
DIGEST_RATE = 64 << 20
#: Seconds to wait for its reason when the source failed first (else the source's error).
FAILURE_TIMEOUT = 10.0
#: Seconds between SIGTERM and SIGKILL.
TERM_GRACE = 2.0
#: Lines of its stderr that are not warnings kept for an error message (a crash's last words).
TAIL_LINES = 3


async def _read_lines(stream: trio.abc.ReceiveStream, on_line: Callable[[str], None]) -> None:
    """Call ``on_line`` with each line of ``stream`` until it ends (a line too long ends it)."""
    buf = bytearray()
    while chunk := await stream.receive_some(65536):
        buf += chunk
        while (end := buf.find(b"\n")) >= 0:
            on_line(buf[:end].decode(errors="replace"))
            del buf[: end + 1]
        if len(buf) > MAX_MESSAGE:
            on_line("(a line of more than 1 MiB)")
            return
    if buf:
        on_line(buf.decode(errors="replace"))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class DestinationProcess:
    """The demo's destination, running in a child process: its port, then its report."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.port: int | None = None
        self.report: dict[str, Any] | None = None
        self.listening = trio.Event()
        self.reported = trio.Event()  # its last message came (or none will)
        self.exited = trio.Event()  # stdout and stderr closed: it exited
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._open = 2

    def on_message(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.tail.append(line)
        elif self.port is None and isinstance(message.get("port"), int):
            self.port = message["port"]
            self.listening.set()
        else:
            self.report = message
            self.reported.set()

    def on_stderr(self, line: str) -> None:
        if line.startswith("multifd demo: warning: "):
            print(shown(line), file=sys.stderr, flush=True)  # its warnings are the demo's
        elif line.strip():
            self.tail.append(line)

    async def read(
        self, stream: trio.abc.ReceiveStream | None, on_line: Callable[[str], None]
    ) -> None:
        try:
            if stream is not None:
                await _read_lines(stream, on_line)
        finally:
            self._open -= 1
            if not self._open:
                self.listening.set()  # no port and no report will come now
                self.reported.set()
                self.exited.set()

    def failure(self, why: str) -> DestinationFailed:
        """The destination's error, or ``why`` with its exit status and last words."""
        error = (self.report or {}).get("error")
        if isinstance(error, str):
            return DestinationFailed(f"the destination failed: {error}")
        rc = self.process.returncode
        if rc is None:
            status = "still running"
        elif rc < 0:
            status = f"killed by {_signal_name(-rc)}"
        else:
            status = f"exited with status {rc}"
        said = f": {' | '.join(self.tail)}" if self.tail else ""
        return DestinationFailed(f"the destination process {why} ({status}){said}")

    async def finish(self, timeout: float) -> dict[str, Any]:
        """Its report (stats and digests); DestinationFailed if it failed, ended without one, or
        sent none within ``timeout`` s."""
        with trio.move_on_after(timeout):
            await self.reported.wait()
        if self.report is not None and isinstance(self.report.get("digests"), dict):
            return self.report
        if not self.reported.is_set():
            raise self.failure(f"did not report within {timeout:g} s")
        with trio.move_on_after(1):  # for its exit status
            await self.process.wait()
        raise self.failure("ended without a report")

    async def end(self) -> None:
        """Close its stdin (it ends by itself then, once it reported), then SIGTERM and SIGKILL
        it by pid, each after TERM_GRACE seconds (SIGTERM at once if it has not reported)."""
        process = self.process
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            if self.report is not None:
                with trio.move_on_after(TERM_GRACE):
                    await process.wait()
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(TERM_GRACE):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()


def _command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The child's command line and environment: the demo's arguments as JSON, and this
    process's multifd_core first on its path (``-P``: never one of the working directory)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-P", "-m", f"{__package__}.demodst", json.dumps(vars(args))]
    return argv, {**os.environ, "PYTHONPATH": path}


@asynccontextmanager
async def destination_process(args: argparse.Namespace) -> AsyncIterator[DestinationProcess]:
    """Start the destination process and wait until it listens; end it when the block ends."""
    argv, env = _command(args)
    pipe = subprocess.PIPE
    process = await trio.lowlevel.open_process(argv, stdin=pipe, stdout=pipe, stderr=pipe, env=env)
    child = DestinationProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child.read, process.stdout, child.on_message)
            nursery.start_soon(child.read, process.stderr, child.on_stderr)
            with trio.move_on_after(START_TIMEOUT):
                await child.listening.wait()
            if child.port is None:
                with trio.move_on_after(1):
                    await process.wait()
                if child.exited.is_set():
                    raise child.failure("ended before it listened")
                raise child.failure(f"did not listen within {START_TIMEOUT:g} s")
            yield child
            nursery.cancel_scope.cancel()
    finally:
        await child.end()


async def _migrate(args: argparse.Namespace, blocks: list[RAMBlock], port: int) -> Source:
    """The source's side: ``--rounds`` rounds into ``port``, a guest writing between them."""
    progress = ProgressBar(args.progress, "migrating")
    rng = random.Random(args.seed)
    async with open_source(blocks, tcp_connector("127.0.0.1", port), source_options(args)) as src:
        async with progress.running(src):
            for r in range(args.rounds - 1):
                await src.send_round()
                # the "guest" keeps writing: about 2 % of the pages change per round
                ram = blocks[0]
                count = max(1, ram.npages // 50)
                for off in dirty_some_pages(ram.memory, args.page_size, count, rng, r + 1):
                    ram.mark_dirty(off)
            await src.complete()
    return src


def _differences(here: dict[str, str], there: dict[str, Any]) -> list[str]:
    names = sorted(set(here) | set(there))
    return [f"{n} (xxh3-128 {here.get(n)} here, {there.get(n)} there)" for n in names
            if here.get(n) != there.get(n)]  # fmt: skip


async def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    page_size = args.page_size
    size = args.size
    if size % page_size:
        raise ConfigError(f"--size must be a multiple of the page size {page_size}")
    source_options(args)  # a bad option is refused here, before the child starts
    destination_options(args)
    t0 = time.monotonic()
    bios_size = min(256 << 10, size)
    src_blocks = [
        RAMBlock("pc.ram", vm_like_image(size, page_size, seed=1), page_size),
        RAMBlock("pc.bios", vm_like_image(bios_size, page_size, seed=2), page_size),
    ]
    gen_seconds = time.monotonic() - t0
    async with destination_process(args) as child:
        assert child.port is not None
        try:
            src = await _migrate(args, src_blocks, child.port)
        except ChannelError as exc:  # often only the consequence of the destination failing
            with trio.move_on_after(FAILURE_TIMEOUT):
                await child.reported.wait()
                await child.process.wait()
            if child.process.returncode not in (None, 0):
                raise child.failure("failed") from exc
            raise
        report = await child.finish(REPORT_TIMEOUT + (size + bios_size) / DIGEST_RATE)
        t1 = time.monotonic()  # while the child exits
        digests = await digest_blocks(src_blocks, trio.CapacityLimiter(1))
        # each copy hashed by its own process: the time the check took, as if in one
        verify_seconds = time.monotonic() - t1 + float(report.get("digest-seconds", 0))
    differ = _differences(digests, report["digests"])
    if differ:
        raise IncompleteMigration(
            "destination differs from the source after migration: " + "; ".join(differ)
        )
    out = src.stats.as_dict()
    out["verified"] = True
    out["image-seconds"] = round(gen_seconds, 3)
    out["verify-seconds"] = round(verify_seconds, 3)
    out["destination"] = report.get("stats")
    if not args.json:
        print(
            summary(
                "demo migration",
                src.stats,
                {
                    "verified": "destination equals source",
                    "image": f"VM-like, {human(size)} + {human(bios_size)}, {args.rounds} rounds",
                },
            )
        )
    return out
