"""Emulated networks for the real-network tests: two network namespaces joined by real links.

A :class:`NetPair` is two fresh namespaces (``src`` and ``dst``, named after this process's pid so
that concurrent runs never collide), each with ``lo`` up, joined by two paths:

- a **veth pair** (``10.199.1.1`` <-> ``10.199.1.2``): the kernel's own link. Its conditions are
  set with ``tc``: ``netem`` (delay, jitter, loss, rate) where the kernel has it, ``tbf`` for a
  rate limit. Cutting it is ``ip link set ... down`` on both ends.
- a **user-space delay line** (``10.199.2.1`` <-> ``10.199.2.2``), for kernels built without
  ``CONFIG_NET_SCH_NETEM``: two TUN devices, opened here in the root namespace (``TUNSETIFF``) and
  then moved into one namespace each (their file descriptors stay valid), and a thread that
  forwards every IP packet from one to the other the way netem's tfifo does: each packet is lost
  with probability ``loss``, else it leaves after the serialisation time of its direction's rate
  (if any) plus ``delay`` plus a uniform jitter in ``[-jitter, +jitter]`` (so, like netem,
  jitter reorders packets), with netem's queue limit. The kernels' TCP stacks in the namespaces
  see real packets delayed, reordered and dropped; ``tbf`` can rate-limit the TUN devices too.

:func:`open_link` picks the emulation for a set of :class:`Conditions` and says which one ran
(:attr:`Link.emulation`). Everything is removed when the context ends, also on failure.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import heapq
import itertools
import json
import os
import random
import re
import select
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
SS = shutil.which("ss") or "/usr/bin/ss"

VETH_SRC_ADDR = "10.199.1.1"
VETH_DST_ADDR = "10.199.1.2"
TUN_SRC_ADDR = "10.199.2.1"
TUN_DST_ADDR = "10.199.2.2"

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000

_counter = itertools.count()


class NetSimError(RuntimeError):
    """A command that sets up or tears down the emulated network failed."""


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command (ip, tc, ss); raise :class:`NetSimError` with its stderr when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetSimError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _unique(prefix: str) -> str:
    """A name unique to this process (pid) and call; at most 15 characters (IFNAMSIZ - 1)."""
    name = f"{prefix}{os.getpid()}x{next(_counter)}"
    assert len(name) <= 14, name  # room for a one-letter suffix
    return name


# --- capability probes ----------------------------------------------------------------------


@functools.cache
def namespaces_unavailable() -> str | None:
    """None when network namespaces (and veth pairs) can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "iproute2's ip is not installed"
    name = _unique("mfp")
    made = sh(IP, "netns", "add", name, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        veth = sh(
            IP, "-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb", check=False
        )
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        sh(IP, "netns", "del", name, check=False)
    return None


@functools.cache
def kernel_has_netem() -> bool:
    """Whether ``tc qdisc ... netem`` works (CONFIG_NET_SCH_NETEM); probed in a scratch netns."""
    name = _unique("mfq")
    sh(IP, "netns", "add", name)
    try:
        sh(IP, "-n", name, "link", "set", "lo", "up")
        probe = sh(
            TC, "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
            check=False,
        )  # fmt: skip
        return probe.returncode == 0
    finally:
        sh(IP, "netns", "del", name, check=False)


@functools.cache
def tun_unavailable() -> str | None:
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist (CONFIG_TUN)"
    return None


# --- conditions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditions:
    """What the link does to packets, in each direction (as netem's parameters)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float = 0.0  # 0: no limit

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)

    def label(self) -> str:
        parts = []
        if self.delay_ms or self.jitter_ms:
            parts.append(f"delay {self.delay_ms:g}ms jitter {self.jitter_ms:g}ms")
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}%")
        if self.rate_mbit:
            parts.append(f"rate {self.rate_mbit:g}mbit")
        return ", ".join(parts) or "no impairment"


# --- the user-space delay line --------------------------------------------------------------


@dataclass
class DelayLineStats:
    packets_in: int = 0
    bytes_in: int = 0
    lost: int = 0  # dropped by the loss draw
    overflow: int = 0  # dropped because the queue was full (netem's limit)
    cut: int = 0  # dropped because the link was cut
    write_errors: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    reordered: int = 0  # packets sent before one that arrived earlier in the same direction
    max_queue: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def open_tun(name: str) -> int:
    """Open a new TUN device ``name`` (layer 3, no packet info) in this namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DelayLine:
    """netem in user space between two TUN fds: loss, rate, delay and jitter, per direction.

    One thread polls both fds; a packet read from one is either dropped or scheduled on a heap
    by its time to send, then written to the other fd when that time comes. The schedule follows
    netem: ``depart = max(now, last departure of this direction) + size / rate`` (when a rate is
    set), then ``send at = depart + delay + uniform(-jitter, jitter)`` (never before ``depart``).
    Packets beyond ``limit`` queued are dropped, as netem's default 1000-packet limit does.
    """

    def __init__(
        self,
        fd_a: int,
        fd_b: int,
        conditions: Conditions,
        *,
        limit: int = 10000,
        seed: int = 0,
    ) -> None:
        self.fds = (fd_a, fd_b)
        self.conditions = conditions
        self.limit = limit
        self.stats = DelayLineStats()
        self._rng = random.Random(seed)
        self._cut = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="netsim-delay-line", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def cut(self) -> None:
        """From now on drop every packet, both ways (and those already queued)."""
        self._cut = True

    def stop(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(10)
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self._thread.is_alive():
            raise NetSimError("the delay line thread did not stop")
        if self._error is not None:
            raise NetSimError(f"the delay line failed: {self._error!r}") from self._error

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by stop()
            self._error = exc

    def _loop(self) -> None:
        fd_a, fd_b = self.fds
        peer = {fd_a: fd_b, fd_b: fd_a}
        schedule = _Schedule(self.conditions, self.fds, self._rng, self.stats, self.limit)
        poller = select.poll()
        for fd in (fd_a, fd_b, self._stop_r):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll(schedule.wait_ms(time.monotonic())):
                if fd == self._stop_r:
                    return
                self._read_batch(fd, peer[fd], schedule)
            self._write_due(schedule)

    def _read_batch(self, fd: int, out: int, schedule: _Schedule) -> None:
        """Read what ``fd`` has (bounded, so that due packets are never starved) and schedule
        each packet for ``out``, or drop it."""
        st = self.stats
        for _ in range(512):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                break
            now = time.monotonic()  # this packet's arrival (not the batch's)
            st.packets_in += 1
            st.bytes_in += len(pkt)
            if self._cut:
                st.cut += 1
                continue
            schedule.admit(fd, out, pkt, now)

    def _write_due(self, schedule: _Schedule) -> None:
        """Write every packet whose time has come to its fd (a failed write is a lost packet)."""
        st = self.stats
        for n, out, pkt in schedule.due(time.monotonic()):
            if self._cut:
                st.cut += 1
                continue
            schedule.note_order(n, out)
            try:
                os.write(out, pkt)
            except OSError as exc:  # e.g. EIO while the device is down: a lost packet
                if exc.errno not in (errno.EIO, errno.EAGAIN, errno.EINVAL, errno.ENOBUFS):
                    raise
                st.write_errors += 1
                continue
            st.packets_out += 1
            st.bytes_out += len(pkt)


class _Schedule:
    """The delay line's queue: packets by their time to send (netem's rule, see DelayLine)."""

    def __init__(
        self,
        c: Conditions,
        fds: tuple[int, int],
        rng: random.Random,
        stats: DelayLineStats,
        limit: int,
    ) -> None:
        self.delay = c.delay_ms / 1000
        self.jitter = c.jitter_ms / 1000
        self.loss = c.loss_pct / 100
        self.rate = c.rate_mbit * 1e6 / 8  # bytes per second
        self.next_free = dict.fromkeys(fds, 0.0)  # by source fd
        self.last_seq_out = dict.fromkeys(fds, -1)  # by destination fd
        self.rng = rng
        self.stats = stats
        self.limit = limit
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.seq = itertools.count()

    def wait_ms(self, now: float) -> int:
        """How long to poll: until the first packet is due (-1: no packet queued)."""
        if self.heap:
            return max(0, int((self.heap[0][0] - now) * 1000 + 0.999))
        return -1

    def admit(self, fd: int, out: int, pkt: bytes, now: float) -> None:
        """Lose ``pkt`` (read from ``fd`` at ``now``), drop it (queue full) or queue it."""
        st, rng = self.stats, self.rng
        if self.loss and rng.random() < self.loss:
            st.lost += 1
            return
        if len(self.heap) >= self.limit:
            st.overflow += 1
            return
        depart = now
        if self.rate:
            depart = max(now, self.next_free[fd]) + len(pkt) / self.rate
            self.next_free[fd] = depart
        due = depart + self.delay
        if self.jitter:
            due = max(depart, due + rng.uniform(-self.jitter, self.jitter))
        heapq.heappush(self.heap, (due, next(self.seq), out, pkt))
        st.max_queue = max(st.max_queue, len(self.heap))

    def due(self, now: float) -> Iterator[tuple[int, int, bytes]]:
        """Take the packets due at ``now``, in order: (sequence number, fd, bytes)."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, n, out, pkt = heapq.heappop(heap)
            yield n, out, pkt

    def note_order(self, n: int, out: int) -> None:
        """Count a packet sent to ``out`` after one that arrived later."""
        if n < self.last_seq_out[out]:
            self.stats.reordered += 1
        self.last_seq_out[out] = max(n, self.last_seq_out[out])


# --- the pair of namespaces -----------------------------------------------------------------


@dataclass
class NetPair:
    """Two network namespaces joined by a veth pair (and, on demand, a TUN delay line)."""

    src: str
    dst: str
    veth_src: str
    veth_dst: str
    tun_src: str | None = None
    tun_dst: str | None = None
    delay_line: DelayLine | None = None
    _tun_fds: list[int] = field(default_factory=list)

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` to run inside namespace ``ns`` (``ip netns exec`` execs it: same pid)."""
        return [IP, "netns", "exec", ns, *argv]

    def ip(self, ns: str, *args: str) -> None:
        sh(IP, "-n", ns, *args)

    def tc(self, ns: str, *args: str) -> None:
        sh(TC, "-n", ns, *args)

    # paths

    def add_tun_path(self, conditions: Conditions, *, mtu: int, seed: int) -> None:
        """The user-space delay line: a TUN device in each namespace, forwarded by a thread."""
        base = _unique("mft")
        self.tun_src, self.tun_dst = base + "a", base + "b"
        for name, ns, local, remote in (
            (self.tun_src, self.src, TUN_SRC_ADDR, TUN_DST_ADDR),
            (self.tun_dst, self.dst, TUN_DST_ADDR, TUN_SRC_ADDR),
        ):
            self._tun_fds.append(open_tun(name))
            sh(IP, "link", "set", name, "netns", ns)
            self.ip(ns, "link", "set", name, "mtu", str(mtu), "txqueuelen", "10000", "up")
            self.ip(ns, "addr", "add", local, "peer", remote + "/32", "dev", name)
        self.delay_line = DelayLine(self._tun_fds[0], self._tun_fds[1], conditions, seed=seed)
        self.delay_line.start()

    def set_netem(self, conditions: Conditions) -> None:
        """Kernel netem on both veth ends (delay, jitter, loss, rate)."""
        args = []
        if conditions.delay_ms or conditions.jitter_ms:
            args += ["delay", f"{conditions.delay_ms:g}ms", f"{conditions.jitter_ms:g}ms"]
        if conditions.loss_pct:
            args += ["loss", f"{conditions.loss_pct:g}%"]
        if conditions.rate_mbit:
            args += ["rate", f"{conditions.rate_mbit:g}mbit"]
        args += ["limit", "10000"]
        for ns, dev in ((self.src, self.veth_src), (self.dst, self.veth_dst)):
            self.tc(ns, "qdisc", "replace", "dev", dev, "root", "netem", *args)

    def set_rate(self, rate_mbit: float, *, tun: bool = False) -> None:
        """Kernel tbf on both ends of the veth pair (or of the TUN path): a rate limit."""
        rate = rate_mbit * 1e6 / 8
        burst = max(64 << 10, int(rate / 100))  # ~10 ms of traffic, at least 64 KiB
        pairs = (
            ((self.src, self.tun_src), (self.dst, self.tun_dst))
            if tun
            else ((self.src, self.veth_src), (self.dst, self.veth_dst))
        )
        for ns, dev in pairs:
            assert dev is not None
            self.tc(
                ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms",
            )  # fmt: skip

    def cut_veth(self) -> None:
        """Cut the veth cable: both ends administratively down (packets in flight are lost)."""
        self.ip(self.src, "link", "set", self.veth_src, "down")
        self.ip(self.dst, "link", "set", self.veth_dst, "down")

    # observation

    def link_stats(self, ns: str, dev: str) -> dict[str, int]:
        """The kernel's counters of ``dev`` (rx/tx bytes and packets, drops)."""
        out = sh(IP, "-n", ns, "-s", "-j", "link", "show", "dev", dev).stdout
        s = json.loads(out)[0]["stats64"]
        return {
            "rx_bytes": s["rx"]["bytes"],
            "rx_packets": s["rx"]["packets"],
            "tx_bytes": s["tx"]["bytes"],
            "tx_packets": s["tx"]["packets"],
            "tx_dropped": s["tx"]["dropped"],
        }

    def tcp_info(self, ns: str) -> list[dict[str, float]]:
        """rtt (ms) and retransmissions of every established TCP socket in ``ns`` (``ss -ti``)."""
        out = sh(IP, "netns", "exec", ns, SS, "-tniH", "state", "established").stdout
        infos = []
        for m in re.finditer(r"\brtt:([\d.]+)/([\d.]+)(?P<rest>.*)", out):
            rest = m.group("rest")
            retrans = re.search(r"\bretrans:\d+/(\d+)", rest)
            infos.append(
                {
                    "rtt_ms": float(m.group(1)),
                    "rttvar_ms": float(m.group(2)),
                    "retrans": float(retrans.group(1)) if retrans else 0.0,
                }
            )
        return infos

    # teardown

    def close(self) -> None:
        errors = []
        if self.delay_line is not None:
            try:
                self.delay_line.stop()
            except NetSimError as exc:
                errors.append(str(exc))
        for fd in self._tun_fds:  # closing a (non-persistent) TUN fd deletes its device
            os.close(fd)
        self._tun_fds.clear()
        for ns in (self.src, self.dst):  # takes the veth ends with it
            proc = sh(IP, "netns", "del", ns, check=False)
            if proc.returncode != 0 and "No such file" not in proc.stderr:
                errors.append(proc.stderr.strip())
        if errors:
            raise NetSimError("; ".join(errors))


@contextmanager
def netpair() -> Iterator[NetPair]:
    """Two fresh namespaces ``mfd<pid>x<n>s`` / ``...d`` with lo up and a veth pair between."""
    base = _unique("mfd")
    pair = NetPair(src=base + "s", dst=base + "d", veth_src=base + "a", veth_dst=base + "b")
    with ExitStack() as stack:
        for ns in (pair.src, pair.dst):
            sh(IP, "netns", "add", ns)
            stack.callback(sh, IP, "netns", "del", ns, check=False)
        pair.ip(
            pair.src, "link", "add", pair.veth_src, "type", "veth",
            "peer", "name", pair.veth_dst, "netns", pair.dst,
        )  # fmt: skip
        for ns, dev, addr in (
            (pair.src, pair.veth_src, VETH_SRC_ADDR),
            (pair.dst, pair.veth_dst, VETH_DST_ADDR),
        ):
            pair.ip(ns, "link", "set", "lo", "up")
            pair.ip(ns, "addr", "add", addr + "/24", "dev", dev)
            pair.ip(ns, "link", "set", dev, "up")
        stack.pop_all()
    try:
        yield pair
    finally:
        pair.close()


@dataclass
class Link:
    """One emulated path between the namespaces, as the tests use it."""

    pair: NetPair
    conditions: Conditions
    emulation: str  # "kernel-netem", "tun-delay-line" or "veth-tbf"
    src_addr: str
    dst_addr: str
    src_dev: str
    dst_dev: str

    @property
    def src(self) -> str:
        return self.pair.src

    @property
    def dst(self) -> str:
        return self.pair.dst

    def cut(self) -> None:
        """Cut the link: no packet passes either way from now on (no RST, no FIN: a cable cut)."""
        if self.emulation == "tun-delay-line":
            assert self.pair.delay_line is not None
            self.pair.delay_line.cut()
        else:
            self.pair.cut_veth()

    def rx_bytes(self) -> int:
        """Bytes the destination's device has received so far."""
        return self.pair.link_stats(self.dst, self.dst_dev)["rx_bytes"]


def choose_emulation(conditions: Conditions, *, force: str | None = None) -> str:
    """``kernel-netem`` when the kernel has netem, else ``tun-delay-line`` for delay/jitter/loss;
    ``veth-tbf`` for a rate limit alone. ``force`` (or $MULTIFD_NETSIM) overrides the choice."""
    force = force or os.environ.get("MULTIFD_NETSIM") or None
    if force:
        return force
    if not conditions.needs_netem:
        return "veth-tbf"
    return "kernel-netem" if kernel_has_netem() else "tun-delay-line"


@contextmanager
def open_link(
    conditions: Conditions, *, emulation: str | None = None, mtu: int = 1500, seed: int = 0
) -> Iterator[Link]:
    """A :class:`NetPair` with ``conditions`` applied on the path :func:`choose_emulation`
    picks; everything is removed when the block ends."""
    kind = choose_emulation(conditions, force=emulation)
    with netpair() as pair:
        if kind == "kernel-netem":
            pair.set_netem(conditions)
            link = Link(
                pair, conditions, kind, VETH_SRC_ADDR, VETH_DST_ADDR, pair.veth_src, pair.veth_dst
            )
        elif kind == "tun-delay-line":
            if tun_unavailable():
                raise NetSimError(f"no netem and no TUN: {tun_unavailable()}")
            pair.add_tun_path(
                Conditions(conditions.delay_ms, conditions.jitter_ms, conditions.loss_pct),
                mtu=mtu,
                seed=seed,
            )
            if conditions.rate_mbit:  # the rate limit by the kernel's tbf on the TUN devices
                pair.set_rate(conditions.rate_mbit, tun=True)
            assert pair.tun_src is not None and pair.tun_dst is not None
            link = Link(
                pair, conditions, kind, TUN_SRC_ADDR, TUN_DST_ADDR, pair.tun_src, pair.tun_dst
            )
        elif kind == "veth-tbf":
            if conditions.needs_netem:
                raise NetSimError(f"veth-tbf cannot emulate {conditions.label()}")
            if conditions.rate_mbit:
                pair.set_rate(conditions.rate_mbit)
            link = Link(
                pair, conditions, kind, VETH_SRC_ADDR, VETH_DST_ADDR, pair.veth_src, pair.veth_dst
            )
        else:
            raise NetSimError(f"unknown emulation {kind!r}")
        yield link


def leftovers() -> list[str]:
    """Namespaces and root-namespace links this process made and did not remove."""
    mine = f"mfd{os.getpid()}x"
    tun = f"mft{os.getpid()}x"
    names = sh(IP, "netns", "list").stdout.split()
    links = re.findall(r"^\d+: ([^:@]+)", sh(IP, "-o", "link").stdout, re.M)
    return [n for n in names + links if n.startswith((mine, tun))]


def reap_stale() -> list[str]:
    """Delete namespaces named by :func:`netpair` for a process that no longer exists (a run
    killed before its cleanup); returns their names."""
    reaped = []
    for name in sh(IP, "netns", "list").stdout.split():
        m = re.fullmatch(r"mf[dpq](\d+)x\d+[sd]?", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            if sh(IP, "netns", "del", name, check=False).returncode == 0:
                reaped.append(name)
    return reaped
