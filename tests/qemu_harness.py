"""Helpers for the tests that drive a real QEMU 7.2 or 10.0 (``tests/test_qemu*.py``).

Everything here is synchronous and bounded: every QMP read has a socket timeout, every wait has a
deadline, and every process this harness starts (QEMU, ``multifd`` commands) is tracked by its
pid and ended by :meth:`Lab.close` (SIGTERM, 2 s grace, then SIGKILL). Nothing is ever killed by
name.

It is also a pytest plugin (a test module loads it with ``pytest_plugins``): it registers the
``qemu`` marker and puts it on every test of a module that sets ``QEMU_TESTS = True``.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from multifd_core.image import vm_like_image

QEMU_BINARY = "qemu-system-x86_64"
#: The QEMUs these tests drive, by version: Debian 12's 7.2 on PATH, and Debian 13's 10.0 from
#: the private root ``.ci/qemu10-root.sh`` builds (its wrapper's path in MULTIFD_QEMU10).
QEMU_VERSIONS = ("7.2", "10.0")
QEMU10_ENV = "MULTIFD_QEMU10"
#: Every QEMU of these tests: small and fast.
QEMU_BASE_ARGS = ("-nodefaults", "-display", "none", "-accel", "tcg", "-machine", "q35")
DEFAULT_MEMORY = "64M"
#: Where ``-device loader`` puts the pattern in guest-physical memory (= offset in pc.ram).
PATTERN_ADDR = 0x100000
#: Legacy windows of pc.ram that guest-physical reads see through VGA/BIOS ROM and MMIO.
LEGACY_HOLE = (0xA0000, 0x100000)
PAGE = 4096
FINAL_STATES = ("completed", "failed", "cancelled")
#: The pattern a source gets in its RAM at PATTERN_ADDR (``pattern_loader``).
PATTERN_SIZE = 4 << 20
RAM_SIZE = 64 << 20


@cache
def pattern() -> bytes:
    """4 MiB of zero, random, text, repeated and single-byte pages; non-zero pages all unique."""
    return bytes(vm_like_image(PATTERN_SIZE, seed=7))


def pattern_file(tmp: Path) -> Path:
    path = tmp / "pattern.bin"
    if not path.exists():
        path.write_bytes(pattern())
    return path


def pattern_loader(tmp: Path) -> tuple[str, str]:
    """QEMU arguments that load :func:`pattern` at PATTERN_ADDR of the guest's RAM."""
    return ("-device", f"loader,file={pattern_file(tmp)},addr={PATTERN_ADDR:#x},force-raw=on")


# A 512-byte boot sector: a 16-bit real-mode guest that keeps writing memory, forever.
# For each segment s = 0x1000, 0x1100, ..., 0x8f00 (the 4 KiB pages from 64 KiB up to 576 KiB)
# it adds s >> 8 (16..143) to the 32-bit counter at offset 0 of that page, then starts again;
# so at any instant page i holds (16 + i) * passes, all pages non-zero and distinct.
# The INVLPG after each write works around QEMU 7.2's TCG dirty tracking (fixed in QEMU 9.0 by
# 03bfc2188f "physmem: Fix migration dirty bitmap coherency with TCG memory access"): a bitmap
# sync clears the migration dirty bits without resetting the vCPU's TLB, so once a page's TLB
# entry is marked dirty its later writes go unnoticed and are silently not migrated (seen here:
# the capture then differs from the source at 0x10000). Dropping the page's TLB entry makes
# every write take the slow path that marks the page dirty.
# Assembled from (GNU as, .code16; objcopy -O binary):
#     fa              cli
#     b8 00 10        outer: mov    $0x1000, %ax
#     8e d8           next:  mov    %ax, %ds
#     66 0f b6 dc            movzbl %ah, %ebx
#     66 01 1e 00 00         addl   %ebx, 0          ; ds:0, the page's counter
#     0f 01 3e 00 00         invlpg 0                ; ds:0
#     05 00 01               add    $0x100, %ax
#     3d 00 90               cmp    $0x9000, %ax
#     72 e8                  jb     next
#     eb e3                  jmp    outer
BOOT_CODE = bytes.fromhex("fa b80010 8ed8 660fb6dc 66011e0000 0f013e0000 050001 3d0090 72e8 ebe3")
COUNTER_FIRST_PAGE = 0x10000
COUNTER_PAGES = 128


def boot_sector() -> bytes:
    """The boot sector above: code, zero padding, 0x55 0xAA."""
    return BOOT_CODE + bytes(510 - len(BOOT_CODE)) + b"\x55\xaa"


def boot_disk(path: Path) -> Path:
    """A 1 MiB raw disk whose first sector is :func:`boot_sector` (SeaBIOS fails tiny disks)."""
    path.write_bytes(boot_sector() + bytes((1 << 20) - 512))
    return path


def read_counters(mem: bytes, base: int = 0) -> list[int]:
    """The guest's 32-bit page counters, from ``mem`` holding guest memory from ``base``."""
    out = []
    for i in range(COUNTER_PAGES):
        at = COUNTER_FIRST_PAGE + i * PAGE - base
        out.append(int.from_bytes(mem[at : at + 4], "little"))
    return out


def qemu_binary(version: str = "7.2") -> str | None:
    """The command of QEMU ``version``, or None where it is not installed."""
    if version == "7.2":
        return shutil.which(QEMU_BINARY)
    if version == "10.0":
        path = os.environ.get(QEMU10_ENV)
        return path if path and os.access(path, os.X_OK) else None
    raise ValueError(f"no QEMU {version} in these tests")


def qemu_available(version: str = "7.2") -> bool:
    return qemu_binary(version) is not None


def skip_unless_qemu(version: str) -> None:
    """Skip the calling test where QEMU ``version`` is absent (CI installs both)."""
    if not qemu_available(version):
        where = QEMU_BINARY if version == "7.2" else f"${QEMU10_ENV} (.ci/qemu10-root.sh)"
        pytest.skip(f"QEMU {version} is not installed ({where})")


def wait_counters_running(q: Qemu, tmp: Path, timeout: float = 20.0) -> list[int]:
    """Wait until every page counter of the boot-sector guest is non-zero."""
    deadline = time.monotonic() + timeout
    size = COUNTER_PAGES * PAGE
    while True:
        mem = q.pmemsave(COUNTER_FIRST_PAGE, size, tmp / f"{q.name}-counters.mem")
        counters = read_counters(mem, COUNTER_FIRST_PAGE)
        if all(counters):
            return counters
        assert time.monotonic() < deadline, f"{q.name}: the guest does not run: {q.log_tail()}"
        time.sleep(0.05)


def check_counters(counters: list[int]) -> None:
    """A consistent instant of the guest: page i holds (16 + i) * p, p or p + 1 passes."""
    assert all(counters), "a page counter is zero"
    assert len(set(counters)) == len(counters), "page counters repeat"
    passes = []
    for i, value in enumerate(counters):
        step = 16 + i
        assert value % step == 0, f"page {i}: {value} is not a multiple of {step}"
        passes.append(value // step)
    assert max(passes) - min(passes) <= 1, passes
    assert passes == sorted(passes, reverse=True), "the pass front is not contiguous"


# --- pytest plugin ------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "qemu: drives a real qemu-system-x86_64 (skipped when it is not installed)"
    )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A module's ``QEMU_TESTS``: True (all its tests drive QEMU) or the names of those that do."""
    for item in items:
        qemu_tests = getattr(getattr(item, "module", None), "QEMU_TESTS", False)
        name = getattr(item, "originalname", item.name)
        if qemu_tests is True or (qemu_tests and name in qemu_tests):
            item.add_marker("qemu")


# --- QMP ----------------------------------------------------------------------------------


class QMPError(RuntimeError):
    """A QMP command returned an error, or the monitor went away."""


class QMP:
    """A minimal synchronous QMP client on a unix socket; every read has a timeout."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.events: list[dict[str, Any]] = []
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
                break
            except OSError:
                sock.close()
                if proc.poll() is not None:
                    raise QMPError(f"QEMU exited with status {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise QMPError(f"no QMP socket at {path} within {timeout} s") from None
                time.sleep(0.02)
        sock.settimeout(timeout)
        self.sock = sock
        self.file = sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except TimeoutError:
            raise QMPError("QMP read timed out") from None
        if not line:
            raise QMPError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.file.write(json.dumps(msg).encode() + b"\n")
            self.file.flush()
        except OSError as exc:
            raise QMPError(f"QMP write failed: {exc}") from exc
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "return" in reply:
                return reply["return"]
            elif "error" in reply:
                err = reply["error"]
                raise QMPError(f"{command}: {err.get('class')}: {err.get('desc')}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()


# --- processes ----------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any], grace: float = 2.0) -> None:
    """End one process we started, by its pid: SIGTERM, ``grace`` seconds, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)


class Qemu:
    """One QEMU process and its monitor."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], qmp: QMP, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.qmp = qmp
        self.log = log

    def cmd(self, command: str, **arguments: Any) -> Any:
        return self.qmp.execute(command, **arguments)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def set_multifd(self, channels: int, method: str, **parameters: Any) -> None:
        self.cmd(
            "migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}]
        )
        self.cmd(
            "migrate-set-parameters",
            **{"multifd-channels": channels, "multifd-compression": method, **parameters},
        )

    def query_migrate(self) -> dict[str, Any]:
        info: dict[str, Any] = self.cmd("query-migrate")
        return info

    def wait_migration(self, timeout: float = 60.0, poll: float = 0.05) -> dict[str, Any]:
        """Poll query-migrate until completed, failed or cancelled (or fail the test)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            if info.get("status") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: migration still {info.get('status')!r} after {timeout} s"
                )
            time.sleep(poll)

    def pmemsave(self, addr: int, size: int, path: Path) -> bytes:
        """Guest-physical memory [addr, addr + size) as QEMU reads it."""
        path.unlink(missing_ok=True)
        self.cmd("pmemsave", val=addr, size=size, filename=os.fspath(path))
        return path.read_bytes()


class MultifdProcess:
    """A ``multifd`` command running as a subprocess (stdout/stderr in files)."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc = proc
        self.out = out
        self.err = err
        self.port: int | None = None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"multifd still running after {timeout} s; stderr: {self.stderr()}"
            ) from None

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout())
        return data


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Lab:
    """Starts QEMUs and ``multifd`` commands in ``tmp``; :meth:`close` ends every one of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # a unix socket path must fit in 108 bytes: a deep tmp_path gets a short directory
        self._short: Path | None = None
        if len(os.fspath(tmp)) > 80:
            self._short = Path(tempfile.mkdtemp(prefix="mfd-qmp-"))
        self.sockets = self._short or tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.qemus: list[Qemu] = []
        self._n = 0

    def qemu(
        self,
        name: str,
        *extra: str,
        paused: bool = True,
        memory: str = DEFAULT_MEMORY,
        qmp_timeout: float = 10.0,
        version: str = "7.2",
    ) -> Qemu:
        """Start QEMU ``version`` (``-S`` unless ``paused`` is False) with QMP on a unix socket."""
        binary = qemu_binary(version)
        if binary is None:
            raise AssertionError(f"QEMU {version} is not installed")
        sock = self.sockets / f"{name}.qmp"
        log = self.tmp / f"{name}.log"
        sock.unlink(missing_ok=True)
        argv = [
            binary,
            *QEMU_BASE_ARGS,
            "-m",
            memory,
            "-qmp",
            f"unix:{sock},server=on,wait=off",
            *(["-S"] if paused else []),
            *extra,
        ]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        try:
            qmp = QMP(sock, proc, timeout=qmp_timeout)
        except QMPError as exc:
            raise AssertionError(f"{name}: {exc}; log: {log.read_text(errors='replace')}") from exc
        q = Qemu(name, proc, qmp, log)
        self.qemus.append(q)
        return q

    def multifd(self, *args: str) -> MultifdProcess:
        """Start ``multifd ARGS...`` (this interpreter's ``multifd_core.cli``)."""
        self._n += 1
        out = self.tmp / f"multifd-{self._n}.out"
        err = self.tmp / f"multifd-{self._n}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                [sys.executable, "-m", "multifd_core.cli", *args],
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
            )
        self.procs.append(proc)
        return MultifdProcess(proc, out, err)

    def qemu_save(
        self,
        output: Path,
        *,
        channels: int,
        method: str,
        uuid: str | None = None,
        timeout: float = 30.0,
        extra: Sequence[str] = (),
        ready_timeout: float = 15.0,
    ) -> MultifdProcess:
        """Start ``multifd qemu-save`` on a free port; returns once it listens (``.port``)."""
        ready = self.tmp / f"ready-{self._n + 1}"
        ready.unlink(missing_ok=True)
        args = [
            "qemu-save",
            "--listen",
            "127.0.0.1:0",
            "--output",
            os.fspath(output),
            "--channels",
            str(channels),
            "--compression",
            method,
            "--ready-file",
            os.fspath(ready),
            "--timeout",
            str(timeout),
            "--json",
            *(["--uuid", uuid] if uuid else []),
            *extra,
        ]
        save = self.multifd(*args)
        deadline = time.monotonic() + ready_timeout
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError, SyntaxError, IndexError):
                address = ast.literal_eval(ready.read_text())
                save.port = int(address[1])
                return save
            if save.proc.poll() is not None:
                raise AssertionError(f"qemu-save exited early: {save.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu-save did not listen in time")
            time.sleep(0.02)

    def restore(
        self, snap: Path, port: int, channels: int, method: str, *extra: str
    ) -> MultifdProcess:
        """Start ``multifd qemu-restore`` of ``snap`` into the QEMU listening on ``port``."""
        return self.multifd(
            "qemu-restore",
            os.fspath(snap),
            "--connect",
            f"127.0.0.1:{port}",
            "--channels",
            str(channels),
            "--compression",
            method,
            *extra,
        )

    def capture(
        self, source: Qemu, snap: Path, *, channels: int, method: str, uuid: str | None = None
    ) -> tuple[MultifdProcess, dict[str, Any]]:
        """Migrate ``source`` (set up already) into a new ``qemu-save`` of ``snap``; both ends
        must succeed. Returns qemu-save and QEMU's final query-migrate."""
        save = self.qemu_save(snap, channels=channels, method=method, uuid=uuid)
        assert save.port is not None
        source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
        info = source.wait_migration(60)
        assert save.wait(60) == 0, save.stderr()
        assert info["status"] == "completed", (info, source.log_tail())
        return save, info

    def close(self) -> None:
        for q in self.qemus:
            q.qmp.close()
        for proc in reversed(self.procs):
            stop_process(proc)
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)


@dataclass
class LiveCapture:
    """What :func:`live_capture` leaves: the source (postmigrate), its boot disk, the snapshot,
    QEMU's final query-migrate, qemu-save's JSON, and the guest's counters in the snapshot."""

    source: Qemu
    disk: Path
    snap: Path
    info: dict[str, Any]
    out: dict[str, Any]
    counters: list[int]


def live_capture(
    lab: Lab, method: str, *extra: str, version: str = "7.2", **parameters: Any
) -> LiveCapture:
    """The boot-sector guest, running, migrated into qemu-save over several sync rounds (2
    channels, ``method``, more migration ``parameters``); checks the snapshot is the source's
    final memory, a consistent instant of the guest, after it ran."""
    disk = boot_disk(lab.tmp / "boot.img")
    drive = ("-drive", f"file={disk},format=raw,if=ide", "-boot", "c")
    source = lab.qemu("src", *drive, *extra, paused=False, version=version)
    before = wait_counters_running(source, lab.tmp)
    time.sleep(1.0)  # let it run

    # Slow enough, and with a downtime limit small enough, that the 128 pages the guest keeps
    # dirtying never fit: QEMU goes round after round until the limit is raised below.
    source.set_multifd(2, method, **{"max-bandwidth": 4 << 20, "downtime-limit": 1, **parameters})
    snap = lab.tmp / "snap"
    save = lab.qemu_save(snap, channels=2, method=method)
    assert save.port is not None
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
    deadline = time.monotonic() + 30
    while True:
        info = source.query_migrate()
        # QEMU 10 may also complete by itself: when its estimate of what is left, taken without
        # a bitmap sync, is 0 (the rounds are checked below)
        if version != "7.2" and info.get("status") == "completed":
            break
        assert info.get("status") in ("setup", "active"), (info, save.stderr())
        if info.get("ram", {}).get("dirty-sync-count", 0) >= 4:
            break
        assert time.monotonic() < deadline, f"no sync rounds: {info}"
        time.sleep(0.05)
    source.cmd("migrate-set-parameters", **{"downtime-limit": 10_000})
    info = source.wait_migration(60)
    assert info["status"] == "completed", (info, source.log_tail())
    assert save.wait(60) == 0, save.stderr()
    out = save.json()
    assert source.cmd("query-status")["status"] == "postmigrate"

    assert info["ram"]["dirty-sync-count"] >= 3
    assert out["ram"]["dirty-sync-count"] >= 3
    # the counter pages went more than once: the first round and at least one re-send
    assert out["ram"]["normal"] >= info["ram"]["normal"] >= 2 * COUNTER_PAGES

    final = source.pmemsave(0, RAM_SIZE, lab.tmp / "src.mem")
    image = block_image(snap, "pc.ram")
    assert outside_legacy_hole(image, final), first_difference(image, final)
    counters = read_counters(image)
    check_counters(counters)
    assert all(c > b for c, b in zip(counters, before, strict=True)), "the guest did not run"
    return LiveCapture(source, disk, snap, info, out, counters)


@contextlib.contextmanager
def lab(tmp: Path) -> Iterator[Lab]:
    the_lab = Lab(tmp)
    try:
        yield the_lab
    finally:
        the_lab.close()


# --- snapshot directories -----------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def block_image(directory: Path, name: str = "pc.ram") -> bytes:
    """The saved image of RAM block ``name`` in a qemu-save directory."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["blocks"]:
        if entry["name"] == name:
            return (directory / entry["file"]).read_bytes()
    raise AssertionError(f"no block {name!r} in {[b['name'] for b in manifest['blocks']]}")


def outside_legacy_hole(a: bytes, b: bytes) -> bool:
    """``a == b`` except inside [0xa0000, 0x100000)."""
    lo, hi = LEGACY_HOLE
    return len(a) == len(b) and a[:lo] == b[:lo] and a[hi:] == b[hi:]


def first_difference(a: bytes, b: bytes) -> str:
    """Where two equal-length images first differ (for assertion messages)."""
    if len(a) != len(b):
        return f"sizes {len(a)} and {len(b)}"
    lo, hi = LEGACY_HOLE
    for start in range(0, len(a), PAGE):
        if lo <= start < hi:
            continue
        if a[start : start + PAGE] != b[start : start + PAGE]:
            return f"first differing page at {start:#x}"
    return "no difference outside the legacy hole"


def return_path_source(lab: Lab, version: str, channels: int, method: str) -> Qemu:
    """A paused QEMU ``version`` with the pattern, multifd set, and return-path on."""
    skip_unless_qemu(version)
    source = lab.qemu("src", *pattern_loader(lab.tmp), version=version)
    source.set_multifd(channels, method)
    source.cmd(
        "migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}]
    )
    return source
