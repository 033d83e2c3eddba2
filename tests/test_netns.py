"""``multifd send`` and ``multifd recv`` across a real, impaired network.

Each test makes two fresh network namespaces (named after this process's pid) joined by a link
(see ``netsim.py``), runs ``multifd recv`` in one and ``multifd send`` in the other with
``ip netns exec``, and removes everything afterwards, also on failure. The kernels' TCP stacks
see every impairment at packet level:

- ``kernel-netem``: ``tc qdisc netem`` (delay, jitter, loss, rate) on a veth pair, where the kernel
  has netem;
- ``tun-delay-line``: where it has not (``CONFIG_NET_SCH_NETEM`` unset), a user-space netem: two
  TUN devices, one per namespace, and a thread of this process forwarding every IP packet between
  them with netem's delay, uniform jitter (reordering like netem), random loss and queue limit;
  a rate limit on that path is the kernel's ``tbf`` on the TUN devices;
- ``veth-tbf``: a veth pair with the kernel's ``tbf`` rate limit (no netem needed).

The emulation that ran is part of every test id (``MULTIFD_NETSIM=tun-delay-line`` forces the
user-space one where netem exists). Each impairment is checked from the kernels' side, not just
set: TCP's round-trip estimates (``ss -ti``) for delay, its retransmission counter for loss, the
destination device's byte counter for a rate limit. Figures (time, throughput, round trips,
retransmissions, the delay line's counters) are printed per test (``pytest -s`` or ``-rP``) and
recorded as junit properties.

Cutting the link mid-migration (veth down, or the delay line dropping everything: no RST, no FIN)
must end both processes with ``ChannelStalled`` through their ``--idle-timeout``.

The namespace tests skip only where network namespaces cannot be created (not root, no ``ip``);
the delay line's own tests (at the end) need neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from multifd_core.image import vm_like_image

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for netsim
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import netsim
from netsim import Conditions, Link
from procs import one_line_error, wait_ready_file

_WHY_NOT = netsim.namespaces_unavailable()
#: the tests that make namespaces; they are the only ones that skip, and only for this reason
needs_netns = pytest.mark.skipif(
    _WHY_NOT is not None, reason=f"network namespaces cannot be created: {_WHY_NOT}"
)

_script = shutil.which("multifd", path=os.path.dirname(sys.executable))
MULTIFD = [_script] if _script else [sys.executable, "-m", "multifd_core.cli"]

PS = 4096
#: seconds one migration may take before the test fails (and kills both processes)
TIMEOUT = 30
#: the idle timeout both ends get in the link-cut tests, and how long after the cut both must
#: have exited (the timeout, plus slack for a loaded 2-core machine)
IDLE_TIMEOUT = 2.0
CUT_BOUND = IDLE_TIMEOUT + 6.0


# --- inputs ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    files: list[Path]
    sums: dict[str, str]

    @property
    def total(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inputs]:
    """A 32 MiB VM-like image (a third zero pages; random, text, repeated pages: every page
    unique) and a 100003-byte random file (a partial last page)."""
    d = tmp_path_factory.mktemp("netns-inputs")
    image = d / "guest.ram"
    image.write_bytes(vm_like_image(32 << 20, PS, seed=6))
    odd = d / "odd.bin"
    odd.write_bytes(random.Random(6).randbytes(100003))
    files = [image, odd]
    yield Inputs(files, {p.name: sha256(p) for p in files})
    for p in files:
        p.unlink()


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """64 MiB of random pages: far more than the sockets' buffers hold, so that a sender cut
    off early still has pages to send (it cannot finish into its kernel buffers)."""
    path = tmp_path_factory.mktemp("netns-bulk") / "bulk.bin"
    path.write_bytes(random.Random(64).randbytes(64 << 20))
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def stale_reaped() -> None:
    """Namespaces left by an earlier run of these tests that was killed (its pid is gone)."""
    netsim.reap_stale()


@pytest.fixture
def nothing_left_behind(stale_reaped: None) -> Iterator[None]:
    """After the test: every namespace, device and thread it made is gone."""
    threads = set(threading.enumerate())
    yield
    assert netsim.leftovers() == []
    assert not [t for t in threading.enumerate() if t not in threads and t.is_alive()]


# --- processes ------------------------------------------------------------------------------


@dataclass
class Done:
    rc: int
    out: str
    err: str
    seconds: float  # from start to exit, as this process saw it


@contextmanager
def spawn_in(link: Link, ns: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``multifd ARGS`` inside namespace ``ns``; killed by pid if still running at the end."""
    proc = subprocess.Popen(
        link.pair.exec_argv(ns, [*MULTIFD, *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)  # ip netns exec execs: this is multifd


def sender(link: Link, port: int, *args: str) -> AbstractContextManager[subprocess.Popen[str]]:
    """``multifd send`` in the source namespace, to the receiver's ``port`` across the link."""
    return spawn_in(link, link.src, "send", "--connect", f"{link.dst_addr}:{port}", *args)


def finish(proc: subprocess.Popen[str], started: float, timeout: float = TIMEOUT) -> Done:
    try:
        out, err = proc.communicate(timeout=max(0.1, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args!r} still running {timeout} s after it started")
    return Done(proc.returncode, out, err, time.monotonic() - started)


def finish_both(
    a: subprocess.Popen[str], b: subprocess.Popen[str], started: float, timeout: float
) -> tuple[Done, Done]:
    """Wait for both processes at once, so that each one's exit time is its own."""
    exited: dict[int, float] = {}
    while len(exited) < 2:
        for proc in (a, b):
            if proc.pid not in exited and proc.poll() is not None:
                exited[proc.pid] = time.monotonic() - started
        if time.monotonic() - started > timeout:
            late = [p.args for p in (a, b) if p.pid not in exited]
            pytest.fail(f"{late!r} still running {timeout} s after the link was cut")
        time.sleep(0.01)
    done = []
    for proc in (a, b):
        out, err = proc.communicate()  # one line each: the pipes never filled
        done.append(Done(proc.returncode, out, err, exited[proc.pid]))
    return done[0], done[1]


@contextmanager
def receiver(
    link: Link, tmp: Path, *args: str
) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """``multifd recv`` in the destination namespace, on the link's address, port 0; yields
    the process, its port and its output directory once it listens."""
    out_dir = tmp / "out"
    ready = tmp / "ready"
    with spawn_in(
        link,
        link.dst,
        "recv",
        "--listen",
        f"{link.dst_addr}:0",
        "--output",
        str(out_dir),
        "--ready-file",
        str(ready),
        "--timeout",
        "20",
        *args,
    ) as proc:
        host, port = wait_ready_file(proc, ready, 20)
        assert host == link.dst_addr
        yield proc, port, out_dir


# --- what TCP saw ---------------------------------------------------------------------------


@dataclass
class Sampler:
    """Samples, every ``period`` s while a migration runs, the kernel's own view of it: the
    round-trip estimates of the source's TCP connections (``ss -ti``) and the byte counter of
    the destination's device (for the rate actually achieved on the link)."""

    link: Link
    period: float = 0.1
    rtts: list[float] = field(default_factory=list)
    rx: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, rx bytes)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                before = time.monotonic()
                rx = self.link.rx_bytes()
                self.rx.append(((before + time.monotonic()) / 2, rx))
                self.rtts.extend(i["rtt_ms"] for i in self.link.pair.tcp_info(self.link.src))
            except (netsim.NetSimError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.period)

    def peak_mbit(self, min_window: float) -> float:
        """The highest rate (Mbit/s) the destination received at, over any window of at least
        ``min_window`` s between two samples."""
        best = 0.0
        for i, (t0, b0) in enumerate(self.rx):
            for t1, b1 in self.rx[i + 1 :]:
                if t1 - t0 >= min_window:
                    best = max(best, (b1 - b0) * 8 / 1e6 / (t1 - t0))
        return best


def retransmitted_segments(link: Link, ns: str) -> int:
    """TCP's RetransSegs counter of namespace ``ns`` (/proc/net/snmp is per namespace)."""
    out = netsim.sh(*link.pair.exec_argv(ns, ["cat", "/proc/net/snmp"])).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("Tcp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index("RetransSegs")])


def report(figures: dict[str, Any], record_property: Any) -> None:
    for key, value in figures.items():
        record_property(key, value)
    print("\nnetns figures: " + json.dumps(figures))


# --- migrations under impairments -----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    conditions: Conditions


CASES = [
    Case("delay-jitter", Conditions(delay_ms=20, jitter_ms=5)),
    Case("loss", Conditions(loss_pct=2)),
    Case("rate", Conditions(rate_mbit=100)),
    Case("combined", Conditions(delay_ms=5, jitter_ms=2, loss_pct=1, rate_mbit=100)),
]
METHODS = [("none", 4), ("zstd", 2)]


def _emulation_id(conditions: Conditions) -> str:
    if _WHY_NOT is not None:
        return "no-netns"
    try:
        return netsim.choose_emulation(conditions)
    except netsim.NetSimError:
        return "unknown"


PARAMS = [
    pytest.param(
        case,
        method,
        channels,
        id=f"{case.name}-{method}-{channels}ch-{_emulation_id(case.conditions)}",
    )
    for case in CASES
    for method, channels in METHODS
]


@needs_netns
@pytest.mark.usefixtures("nothing_left_behind")
@pytest.mark.parametrize(("case", "method", "channels"), PARAMS)
def test_migration_over_impaired_link(
    tmp_path: Path,
    inputs: Inputs,
    case: Case,
    method: str,
    channels: int,
    record_property: Any,
) -> None:
    """32 MiB VM-like image + an odd-sized file, send -> recv across the emulated link: both
    exit 0, every file arrives byte for byte, and the impairment really was on TCP's path."""
    cond = case.conditions
    common = ["--channels", str(channels), "--compression", method, "--json"]
    with ExitStack() as stack:
        link = stack.enter_context(netsim.open_link(cond, seed=zlib.crc32(case.name.encode())))
        recv, port, out_dir = stack.enter_context(receiver(link, tmp_path, *common))
        with Sampler(link) as sampler:
            started = time.monotonic()
            send = stack.enter_context(sender(link, port, *common, *map(str, inputs.files)))
            sent = finish(send, started)
            received = finish(recv, started)
        assert link.emulation == _emulation_id(cond)  # what the test id says
        retrans = retransmitted_segments(link, link.src)
        delay_line = link.pair.delay_line.stats.as_dict() if link.pair.delay_line else None
        rx_bytes = link.rx_bytes()

    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    src = json.loads(sent.out)
    dst = json.loads(received.out)
    assert src["status"] == dst["status"] == "completed"
    assert (dst["ram"]["normal"], dst["ram"]["duplicate"]) == (
        src["ram"]["normal"],
        src["ram"]["duplicate"],
    )
    assert dst["ram"]["multifd-bytes"] == src["ram"]["multifd-bytes"]
    assert sorted(os.listdir(out_dir)) == sorted([*inputs.sums, ".multifd-recv.json"])  # no .part
    for name, digest in inputs.sums.items():
        assert sha256(out_dir / name) == digest, f"{name} differs after the migration"
    assert rx_bytes >= src["ram"]["transferred"], "the migration did not cross the link"

    # the impairment was there, as the kernels' TCP stacks saw it
    rtts = sorted(sampler.rtts)
    if cond.delay_ms:
        assert rtts, "ss never saw the migration's connections"
        floor = 2 * (cond.delay_ms - cond.jitter_ms)  # the shortest possible round trip
        assert rtts[-1] >= floor, (rtts, floor)
    if cond.loss_pct:
        assert retrans > 0, "TCP retransmitted nothing across a lossy link"
        assert delay_line is None or delay_line["lost"] > 0
    window = 0.5
    peak = sampler.peak_mbit(window)
    if cond.rate_mbit:  # the limit held over every window (tbf's burst is 64 KiB)
        assert peak > 0, "the migration was too short to measure the link's rate"
        # 10 %: the samples' timing (a counter read takes a few ms); without the limit the same
        # migration runs at well over twice the rate
        assert peak <= cond.rate_mbit * 1.10 + (64 << 10) * 8 / 1e6 / window, (peak, cond)

    wall = received.seconds  # from the start of send to the exit of recv
    report(
        {
            "test": f"{case.name}-{method}-{channels}ch",
            "emulation": link.emulation,
            "conditions": cond.label(),
            "file-bytes": inputs.total,
            "wire-bytes": src["ram"]["transferred"],
            "wall-s": round(wall, 3),
            "send-migration-s": src["seconds"],
            "MiB/s-of-file-data": round(inputs.total / (1 << 20) / wall, 1),
            "link-peak-Mbit/s-0.5s": round(peak, 1),
            "tcp-rtt-ms-median": rtts[len(rtts) // 2] if rtts else None,
            "tcp-rtt-ms-max": rtts[-1] if rtts else None,
            "tcp-retrans-segs": retrans,
            "delay-line": delay_line,
        },
        record_property,
    )


# --- cutting the link mid-migration ---------------------------------------------------------

_IMPAIRED = Conditions(delay_ms=5, jitter_ms=2, loss_pct=1, rate_mbit=40)
CUTS = [
    pytest.param(Conditions(rate_mbit=40), "veth-tbf", id="veth-down-under-veth-tbf"),
    pytest.param(_IMPAIRED, None, id=f"dead-link-under-{_emulation_id(_IMPAIRED)}"),
]


@needs_netns
@pytest.mark.usefixtures("nothing_left_behind")
@pytest.mark.parametrize(("conditions", "emulation"), CUTS)
def test_link_cut_mid_migration(
    tmp_path: Path,
    bulk: Path,
    conditions: Conditions,
    emulation: str | None,
    record_property: Any,
) -> None:
    """The link goes dead (veth down, or the delay line drops everything) while pages flow: no
    RST, no FIN, just silence. Both ends notice through their idle timeout and exit 1 with one
    line naming the stall, within CUT_BOUND s of the cut; recv leaves no file behind."""
    idle = ["--idle-timeout", str(IDLE_TIMEOUT)]
    common = ["--channels", "4", "--compression", "none"]
    with ExitStack() as stack:
        link = stack.enter_context(netsim.open_link(conditions, emulation=emulation))
        recv, port, out_dir = stack.enter_context(receiver(link, tmp_path, *common, *idle))
        started = time.monotonic()
        send = stack.enter_context(sender(link, port, *common, *idle, str(bulk)))
        before = 2 << 20  # cut once this much has crossed: pages are flowing on every channel
        while link.rx_bytes() < before:
            assert send.poll() is None, f"send ended before the cut: {send.communicate()}"
            assert recv.poll() is None, f"recv ended before the cut: {recv.communicate()}"
            assert time.monotonic() - started < TIMEOUT, "no data crossed the link"
            time.sleep(0.02)
        crossed = link.rx_bytes()
        link.cut()
        cut_at = time.monotonic()
        assert send.poll() is None and recv.poll() is None, "the migration ended before the cut"
        received, sent = finish_both(recv, send, cut_at, CUT_BOUND)

    assert received.rc == 1, received
    assert sent.rc == 1, sent
    recv_line = one_line_error(received, "recv")
    send_line = one_line_error(sent, "send")
    assert "ChannelStalled" in recv_line, recv_line
    assert "ChannelStalled" in send_line, send_line
    assert os.listdir(out_dir) == [], "recv left files behind"
    # neither end gave up before its idle timeout had passed
    assert received.seconds >= IDLE_TIMEOUT * 0.9
    assert sent.seconds >= IDLE_TIMEOUT * 0.9
    report(
        {
            "test": "link-cut",
            "emulation": link.emulation,
            "conditions": conditions.label(),
            "crossed-before-cut": crossed,
            "recv-exit-after-cut-s": round(received.seconds, 3),
            "send-exit-after-cut-s": round(sent.seconds, 3),
            "idle-timeout-s": IDLE_TIMEOUT,
            "recv-error": recv_line,
            "send-error": send_line,
        },
        record_property,
    )


# --- the user-space delay line itself (no namespace, no root) --------------------------------


@contextmanager
def delay_line_between_sockets(
    conditions: Conditions, seed: int = 1
) -> Iterator[tuple[socket.socket, socket.socket, netsim.DelayLine]]:
    """A DelayLine between two datagram socket pairs (they keep packet boundaries, as TUN fds
    do): yields the outer ends ``a`` and ``b`` and the line."""
    a, a_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b, b_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, a_in, b, b_in:
        a_in.setblocking(False)
        b_in.setblocking(False)
        line = netsim.DelayLine(a_in.fileno(), b_in.fileno(), conditions, seed=seed)
        line.start()
        try:
            yield a, b, line
        finally:
            line.stop()


def _send_and_collect(
    a: socket.socket, b: socket.socket, count: int, size: int, gap: float = 0.0
) -> list[tuple[int, float, float]]:
    """``count`` packets of ``size`` bytes from ``a``; the (sequence number, sent, received)
    times of those that reach ``b`` (until nothing comes for 0.5 s)."""
    got: list[tuple[int, float, float]] = []

    def collect() -> None:
        b.settimeout(0.5)
        while True:
            try:
                pkt = b.recv(65536)
            except TimeoutError:
                return
            seq, sent = struct.unpack_from("<Qd", pkt)
            got.append((seq, sent, time.monotonic()))

    reader = threading.Thread(target=collect)
    reader.start()
    for i in range(count):
        a.send(struct.pack("<Qd", i, time.monotonic()).ljust(size, b"\0"))
        if gap:
            time.sleep(gap)
    reader.join(30)
    return got


def test_delay_line_delay_jitter_and_reordering() -> None:
    """Every packet arrives, none before delay - jitter, and jitter reorders them (as netem)."""
    with delay_line_between_sockets(Conditions(delay_ms=20, jitter_ms=5)) as (a, b, line):
        got = _send_and_collect(a, b, 300, 200, gap=0.0005)
    assert len(got) == 300
    latencies = sorted(recv - sent for _, sent, recv in got)
    assert latencies[0] >= 0.015
    assert latencies[len(latencies) // 2] < 0.045  # the thread keeps up: no queueing delay
    assert latencies[-1] - latencies[0] >= 0.005  # jitter spreads them
    order = [seq for seq, _, _ in got]
    assert order != sorted(order) and sorted(order) == list(range(300))
    assert line.stats.reordered > 0 and line.stats.lost == 0


def test_delay_line_loss() -> None:
    """Each packet is lost with the given probability, independently."""
    with delay_line_between_sockets(Conditions(loss_pct=10), seed=7) as (a, b, line):
        got = _send_and_collect(a, b, 2000, 100, gap=0.0001)
    assert len(got) + line.stats.lost == 2000
    assert 130 <= line.stats.lost <= 270  # 10 % of 2000, within about 5 standard deviations


def test_delay_line_rate_and_cut() -> None:
    """The serialisation time of the rate spaces packets; after cut() nothing passes."""
    with delay_line_between_sockets(Conditions(rate_mbit=8)) as (a, b, line):  # 1 MB/s
        got = _send_and_collect(a, b, 200, 1000)  # 200 kB: 0.2 s at that rate
        assert len(got) == 200
        span = max(r for _, _, r in got) - min(s for _, s, _ in got)
        assert 0.19 <= span <= 0.5
        line.cut()
        assert _send_and_collect(a, b, 10, 100) == []
    assert line.stats.cut == 10
