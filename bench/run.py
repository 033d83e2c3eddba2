#!/usr/bin/env python3
"""The multifd benchmark suite: one command, one run, every comparison as a ratio of that run.

    .venv/bin/python bench/run.py [--quick] [--reps N] [--json FILE] [--only SECTION,...]

Sections: python (Python -> Python over loopback, two processes), iperf3, qemu (QEMU 7.2 -> QEMU
7.2), qemu-save (QEMU 7.2 -> ``multifd qemu-save``), codec (each codec in one thread). See
bench/README.md for what every figure means. Nothing here asserts on time: it measures and
reports, and marks each target MET / NOT MET.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import (
    BenchError,
    Child,
    Children,
    free_port,
    wait_for_listen,
    wait_for_ready_file,
)
from qmp import QMP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20
GiB = 1 << 30
SECTIONS = ("codec", "iperf3", "python", "integrity", "qemu", "qemu-save")
PY_METHODS = ("none", "zlib", "zstd", "lz4")
QEMU_METHODS = ("none", "zlib", "zstd")
INTEGRITY_METHODS = ("none", "zstd")
#: integrity section: mode -> (send's options, recv's options); packet checksums are on by default
INTEGRITY_MODES = {
    "off": (["--no-integrity"], []),
    "on": ([], []),
    "on+verify": (["--verify"], ["--verify"]),
}
CODEC_METHODS = ("zlib", "zstd", "lz4")
LOAD_GUEST_ADDR = 0x100000  # where -device loader puts the pattern in the guest
RSS_SLACK = 64 * MiB
QEMU_MAX_BANDWIDTH = 100 * GiB  # bytes/s for the QEMU source: unthrottled (default 128 MiB/s)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m = statistics.median(vals)
    if all(isinstance(v, int) for v in vals) and float(m).is_integer():
        return int(m)
    return m


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def files_equal(a: Path, b: Path, offset_a: int = 0, length: int | None = None) -> bool:
    """Compare ``length`` bytes of ``a`` from ``offset_a`` with ``b`` (all of it by default),
    reading into two reused buffers (no mapping: keeps this process's RSS small)."""
    size_b = b.stat().st_size
    if length is None:
        if a.stat().st_size - offset_a != size_b:
            return False
        length = size_b
    elif size_b < length:
        return False
    chunk = 8 * MiB
    buf_a, buf_b = bytearray(chunk), bytearray(chunk)
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        fa.seek(offset_a)
        left = length
        while left:
            n = min(chunk, left)
            va, vb = memoryview(buf_a)[:n], memoryview(buf_b)[:n]
            if fa.readinto(va) != n or fb.readinto(vb) != n or va != vb:
                return False
            left -= n
    return True


# --- configuration ------------------------------------------------------------------------


@dataclass
class Config:
    quick: bool
    reps: int
    image_size: int
    pattern_size: int
    random_size: int
    zero_size: int
    channels: tuple[int, ...]
    qemu_channels: tuple[int, ...]
    sections: tuple[str, ...]
    verify: bool
    workdir_parent: Path
    multifd: str
    qemu: str | None
    iperf3: str | None
    methods: tuple[str, ...] = ()  # installed, among PY_METHODS

    @property
    def guest_mib(self) -> int:
        return self.image_size // MiB


@dataclass
class Images:
    workdir: Path
    vm: Path | None = None
    pattern: Path | None = None
    random: Path | None = None
    zero: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.children = Children()
        self.notes: list[str] = []
        self.doc: dict[str, Any] = {s.replace("-", "_"): [] for s in SECTIONS}
        self.doc["startup"] = []
        self.images: Images | None = None
        self.runs = 0
        self.broken: set[tuple[Any, ...]] = set()  # configurations not repeated after a failure

    # --- helpers ------------------------------------------------------------------------------

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        log(f"note: {msg}")

    def run_dir(self, tag: str) -> Path:
        assert self.images is not None
        self.runs += 1
        d = self.images.workdir / f"{self.runs:03d}-{tag}"
        d.mkdir()
        return d

    def listen(
        self, name: str, d: Path, out: str, command: str, *args: str
    ) -> tuple[Child, str, int]:
        """Start ``multifd COMMAND --listen 127.0.0.1:0 ... ARGS`` (its JSON to ``d/OUT.json``,
        errors to ``d/OUT.err``) and wait for the address it listens on."""
        ready = d / "ready"
        child = self.children.spawn(
            name,
            self.mf(command, "--listen", "127.0.0.1:0", "--ready-file", str(ready), *args),
            stdout=d / f"{out}.json",
            stderr=d / f"{out}.err",
        )
        host, port = wait_for_ready_file(ready, child, 60)
        return child, host, port

    def helper(self, *args: str, timeout: float) -> dict[str, Any]:
        """Run bench/workload.py in a child; its JSON result."""
        assert self.images is not None
        d = self.images.workdir
        out, err = d / "helper.out", d / "helper.err"
        child = self.children.spawn(
            f"workload.py {args[0]}",
            [sys.executable, str(HERE / "workload.py"), *args],
            stdout=out,
            stderr=err,
        )
        self.children.wait([child], timeout)
        if child.status != 0:
            raise BenchError(child.describe_failure())
        return dict(json.loads(out.read_text()))

    def mf(self, *args: str) -> list[str]:
        return [self.cfg.multifd, *args]

    # --- workload ------------------------------------------------------------------------------

    def make_images(self, workdir: Path) -> None:
        cfg = self.cfg
        self.images = im = Images(workdir)
        need_vm = {"python", "integrity", "codec", "qemu", "qemu-save"} & set(cfg.sections)
        need_pattern = {"qemu", "qemu-save"} & set(cfg.sections) and cfg.qemu
        if need_vm:
            im.vm = workdir / "vm.img"
            args = ["gen-vm", str(im.vm), str(cfg.image_size), str(cfg.pattern_size)]
            if need_pattern:
                im.pattern = workdir / "pattern.bin"
                args += ["--pattern-file", str(im.pattern)]
            log(f"workload: VM-like image {cfg.image_size // MiB} MiB -> {im.vm}")
            im.info["vm"] = self.helper(*args, timeout=600)
        if "python" in cfg.sections:
            im.random = workdir / "random.img"
            log(f"workload: random image {cfg.random_size // MiB} MiB")
            im.info["random"] = self.helper(
                "gen-random", str(im.random), str(cfg.random_size), timeout=600
            )
            im.zero = workdir / "zero.img"
            im.info["zero"] = self.helper("gen-zero", str(im.zero), str(cfg.zero_size), timeout=600)

    # --- codec ---------------------------------------------------------------------------------

    def section_codec(self) -> None:
        assert self.images is not None and self.images.vm is not None
        methods = [m for m in CODEC_METHODS if m in self.cfg.methods]
        if not methods:
            self.note("codec: no compression plugin installed; skipped")
            return
        log(f"codec: single-thread {', '.join(methods)} on the pattern's non-zero pages")
        result = self.helper(
            "codec", str(self.images.vm), str(self.cfg.pattern_size), *methods, timeout=1800
        )
        for name, r in result["methods"].items():
            row = {"method": name, "pages": result["pages"], "bytes": result["bytes"], **r}
            self.doc["codec"].append(row)
            if "error" in r:
                self.note(f"codec {name}: {r['error']}")
            elif not r["roundtrip_ok"]:
                self.note(f"codec {name}: decompressed pages differ from the source (BUG)")

    # --- iperf3 --------------------------------------------------------------------------------

    def section_iperf3(self) -> None:
        if not self.cfg.iperf3:
            self.note("iperf3 is not installed: its reference is skipped")
            return
        for rep in range(self.cfg.reps):
            for streams in self.cfg.channels:
                tag = f"iperf3 -P {streams} rep {rep + 1}/{self.cfg.reps}"
                try:
                    row = self.iperf3_once(streams)
                except BenchError as exc:
                    row = {"streams": streams, "error": str(exc)}
                    self.note(f"{tag}: {exc}")
                row["rep"] = rep
                self.doc["iperf3"].append(row)
                if "GBps" in row:
                    log(f"{tag}: {row['GBps']:.2f} GB/s")

    def iperf3_once(self, streams: int) -> dict[str, Any]:
        assert self.cfg.iperf3
        d = self.run_dir(f"iperf3-{streams}")
        port = free_port()
        srv = self.children.spawn(
            "iperf3 server",
            [self.cfg.iperf3, "-s", "-1", "-p", str(port)],
            stderr=d / "server.err",
        )
        try:
            wait_for_listen(port, srv, 15)
            cli = self.children.spawn(
                "iperf3 client",
                [
                    self.cfg.iperf3,
                    *("-c", "127.0.0.1", "-p", str(port), "-P", str(streams)),
                    *("-n", str(self.cfg.image_size), "-J"),
                ],
                stdout=d / "client.json",
                stderr=d / "client.err",
            )
            self.children.wait([cli, srv], 120)
            if cli.status != 0:
                raise BenchError(cli.describe_failure())
            end = json.loads((d / "client.json").read_text())["end"]
            received = end["sum_received"]
            return {
                "streams": streams,
                "bytes": received["bytes"],
                "seconds": received["seconds"],
                "GBps": received["bits_per_second"] / 8 / 1e9,
                "client_cpu_s": cli.cpu_seconds,
                "server_cpu_s": srv.cpu_seconds,
            }
        finally:
            self.children.close()
            shutil.rmtree(d, ignore_errors=True)

    # --- Python -> Python ----------------------------------------------------------------------

    def python_matrix(self) -> list[tuple[str, str, int]]:
        cases = [("vm", m, n) for m in self.cfg.methods for n in self.cfg.channels]
        if "none" in self.cfg.methods:
            cases += [("random", "none", 2), ("zero", "none", 2), ("zero+multifd", "none", 2)]
        return cases

    def section_python(self) -> None:
        missing = [m for m in PY_METHODS if m not in self.cfg.methods]
        if missing:
            self.note(f"python: method(s) not installed, skipped: {', '.join(missing)}")
        cases = self.python_matrix()
        for rep in range(self.cfg.reps):
            self.startup_once(rep)
            for image, method, channels in cases:
                tag = f"python {image} {method} {channels}ch rep {rep + 1}/{self.cfg.reps}"
                if ("python", image, method, channels) in self.broken:
                    continue  # failed in an earlier rep: not worth another timeout
                try:
                    row = self.python_once(image, method, channels)
                except BenchError as exc:
                    row = {"image": image, "method": method, "channels": channels}
                    row["error"] = str(exc)
                    self.note(f"{tag}: {exc}")
                    self.broken.add(("python", image, method, channels))
                row["rep"] = rep
                self.doc["python"].append(row)
                if "wall_s" in row:
                    log(
                        f"{tag}: {row['wall_s']:.3f} s wall, {row['nonzero_GBps']:.2f} GB/s, "
                        f"rss {row['send_rss'] // MiB}/{row['recv_rss'] // MiB} MiB"
                        + ("" if row.get("verified", True) else "  OUTPUT DIFFERS")
                    )

    def startup_once(self, rep: int) -> None:
        """What a `multifd` process costs before it migrates anything: interpreter start, imports
        and plugin discovery (`multifd plugins --json`, wall and CPU)."""
        d = self.run_dir("startup")
        try:
            t0 = time.monotonic()
            child = self.children.spawn("multifd plugins", self.mf("plugins", "--json"))
            self.children.wait([child], 60)
            assert child.ended is not None
            if child.status == 0:
                row = {"rep": rep, "wall_s": child.ended - t0, "cpu_s": child.cpu_seconds}
                row["rss"] = child.max_rss_bytes
                self.doc["startup"].append(row)
        except BenchError as exc:
            self.note(f"startup: {exc}")
        finally:
            self.children.close()
            shutil.rmtree(d, ignore_errors=True)

    # --- integrity: the same migration with packet checksums off, on, and with --verify ------

    def section_integrity(self) -> None:
        methods = [m for m in INTEGRITY_METHODS if m in self.cfg.methods]
        for rep in range(self.cfg.reps):
            for method in methods:
                for mode, (send_args, recv_args) in INTEGRITY_MODES.items():  # side by side
                    tag = f"integrity {mode} vm {method} 2ch rep {rep + 1}/{self.cfg.reps}"
                    try:
                        row = self.python_once("vm", method, 2, send_args, recv_args)
                    except BenchError as exc:
                        row = {"method": method, "channels": 2, "error": str(exc)}
                        self.note(f"{tag}: {exc}")
                    row.update(integrity=mode, rep=rep)
                    self.doc["integrity"].append(row)
                    if "wall_s" in row:
                        log(f"{tag}: {row['wall_s']:.3f} s wall, {row['send_lib_s']:.3f} s lib")

    def python_once(
        self,
        image: str,
        method: str,
        channels: int,
        send_args: list[str] | None = None,
        recv_args: list[str] | None = None,
    ) -> dict[str, Any]:
        """One send/recv pair; ``image`` is an image's name, with ``+MODE`` for a
        ``--zero-page-detection`` other than the default (``zero+multifd``); ``send_args`` /
        ``recv_args``: more options of each end."""
        assert self.images is not None
        file_image, _, zero_mode = image.partition("+")
        src: Path | None = getattr(self.images, file_image)
        assert src is not None
        size = src.stat().st_size
        d = self.run_dir(f"py-{file_image}-{zero_mode or 'default'}-{method}-{channels}")
        timeout = 60 + size / 20e6
        common = ["--channels", str(channels), "--compression", method, "--json", "--no-progress"]
        zero = ["--zero-page-detection", zero_mode] if zero_mode else []
        try:
            out_dir, more = str(d / "out"), send_args or []
            recv, host, port = self.listen(
                "multifd recv", d, "recv", "recv", "--output", out_dir, *common, *(recv_args or [])
            )
            t0 = time.monotonic()
            send = self.children.spawn(
                "multifd send",
                self.mf("send", "--connect", f"{host}:{port}", *common, *zero, *more, str(src)),
                stdout=d / "send.json",
                stderr=d / "send.err",
            )
            self.children.wait([send, recv], timeout)
            assert send.ended is not None and recv.ended is not None
            wall = max(send.ended, recv.ended) - t0
            for c in (send, recv):
                if c.status != 0:
                    raise BenchError(c.describe_failure())
            sj = json.loads((d / "send.json").read_text())
            rj = json.loads((d / "recv.json").read_text())
            verified = None
            if self.cfg.verify:
                out = Path(next(iter(rj["files"].values())))
                verified = files_equal(src, out)
                if not verified:
                    self.note(f"python {image} {method} {channels}ch: output differs (BUG)")
            nonzero = sj["ram"]["normal-bytes"]
            return {
                "image": image,
                "method": method,
                "channels": channels,
                "image_bytes": size,
                "wall_s": wall,
                "send_lib_s": sj["seconds"],
                "recv_lib_s": rj["seconds"],
                "send_exit_s": send.ended - t0,
                "recv_exit_s": recv.ended - t0,
                "nonzero_bytes": nonzero,
                "nonzero_GBps": nonzero / wall / 1e9,
                "nonzero_GBps_lib": nonzero / sj["seconds"] / 1e9 if sj["seconds"] else None,
                "image_GBps": size / wall / 1e9,
                "wire_bytes": sj["ram"]["transferred"],
                "compression_ratio": sj.get("compression-ratio"),
                "send_cpu_s": send.cpu_seconds,
                "recv_cpu_s": recv.cpu_seconds,
                "send_rss": send.max_rss_bytes,
                "recv_rss": recv.max_rss_bytes,
                "verified": verified,
            }
        finally:
            self.children.close()
            shutil.rmtree(d, ignore_errors=True)

    # --- QEMU -> QEMU and QEMU -> qemu-save --------------------------------------------------

    def qemu_argv(self, qmp_path: Path, *extra: str) -> list[str]:
        assert self.cfg.qemu
        return [
            self.cfg.qemu,
            *("-nodefaults", "-display", "none", "-accel", "tcg", "-machine", "q35"),
            *("-m", f"{self.cfg.guest_mib}M", "-S"),
            *("-qmp", f"unix:{qmp_path},server=on,wait=off"),
            *extra,
        ]

    def qemu_matrix(self) -> list[tuple[str, int]]:
        return [(m, n) for m in QEMU_METHODS for n in self.cfg.qemu_channels]

    def section_qemu(self, to_save: bool) -> None:
        key = "qemu_save" if to_save else "qemu"
        label = "QEMU -> qemu-save" if to_save else "QEMU -> QEMU"
        if not self.cfg.qemu:
            self.note(f"qemu-system-x86_64 is not installed: {label} is skipped")
            return
        for rep in range(self.cfg.reps):
            for method, channels in self.qemu_matrix():
                if to_save and method not in self.cfg.methods:
                    continue
                tag = f"{label} {method} {channels}ch rep {rep + 1}/{self.cfg.reps}"
                if (key, method, channels) in self.broken:
                    continue  # failed in an earlier rep: not worth another timeout
                try:
                    row = self.qemu_once(method, channels, to_save)
                except BenchError as exc:
                    row = {"method": method, "channels": channels, "error": str(exc)}
                    self.note(f"{tag}: {exc}")
                    self.broken.add((key, method, channels))
                row["rep"] = rep
                self.doc[key].append(row)
                if "total_ms" in row:
                    log(f"{tag}: {row['total_ms']} ms")

    def configure_migration(self, q: QMP, method: str, channels: int, source: bool) -> None:
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        params: dict[str, Any] = {"multifd-channels": channels, "multifd-compression": method}
        if source:  # QEMU's default max-bandwidth (128 MiB/s) would be all we measure
            params["max-bandwidth"] = QEMU_MAX_BANDWIDTH
        q.cmd("migrate-set-parameters", **params)

    def poll_migration(
        self, q: QMP, timeout: float, watch: list[Child], stall: float = 20.0
    ) -> dict[str, Any]:
        """Poll query-migrate until the migration ends; BenchError when it takes over
        ``timeout`` s, or when its transferred bytes stop moving for ``stall`` s."""
        start = last_change = time.monotonic()
        last = None
        while True:
            st = dict(q.cmd("query-migrate"))
            if st.get("status") in ("completed", "failed", "cancelled"):
                return st
            for c in watch:
                if c.try_reap():
                    raise BenchError(c.describe_failure() + " during the migration")
            now = time.monotonic()
            moved = st.get("ram", {}).get("transferred")
            if moved != last:
                last, last_change = moved, now
            why = None
            if now - start > timeout:
                why = f"still {st.get('status')} after {timeout:.0f} s"
            elif st.get("status") == "active" and now - last_change > stall:
                why = f"stalled: {last} bytes transferred, no progress for {stall:.0f} s"
            if why:
                ram = st.get("ram", {})
                tails = "; ".join(
                    f"{c.name} stderr: {c.stderr_tail(300)}" for c in watch if c.stderr_tail()
                )
                raise BenchError(
                    f"{q.name}: migration {why} (multifd-bytes {ram.get('multifd-bytes')}, "
                    f"normal pages {ram.get('normal')}, remaining {ram.get('remaining')})"
                    + (f"; {tails}" if tails else "")
                )
            time.sleep(0.01)

    def qemu_quit(self, q: QMP | None, child: Child) -> None:
        if q is not None:
            try:
                q.cmd("quit")
            except (BenchError, OSError):
                pass
            q.close()
        try:
            self.children.wait([child], 10)
        except BenchError:
            self.children.end(child)

    def qemu_once(self, method: str, channels: int, to_save: bool) -> dict[str, Any]:
        assert self.images is not None and self.images.pattern is not None
        d = self.run_dir(f"{'save' if to_save else 'qemu'}-{method}-{channels}")
        timeout = 60 + self.cfg.image_size / 10e6
        q = dq = None
        dst: Child | None = None
        try:
            src = self.children.spawn(
                "QEMU source",
                self.qemu_argv(
                    d / "src.qmp",
                    "-device",
                    f"loader,file={self.images.pattern},addr={LOAD_GUEST_ADDR:#x},force-raw=on",
                ),
                stderr=d / "src.err",
            )
            q = QMP(d / "src.qmp", src)
            self.configure_migration(q, method, channels, True)
            if to_save:
                dst, host, port = self.listen(
                    "multifd qemu-save",
                    d,
                    "save",
                    "qemu-save",
                    *("--output", str(d / "snap"), "--channels", str(channels)),
                    *("--compression", method, "--json", "--no-progress"),
                )
            else:
                dst = self.children.spawn(
                    "QEMU destination",
                    self.qemu_argv(d / "dst.qmp", "-incoming", "defer"),
                    stderr=d / "dst.err",
                )
                dq = QMP(d / "dst.qmp", dst)
                self.configure_migration(dq, method, channels, False)
                host, port = "127.0.0.1", free_port()
                dq.cmd("migrate-incoming", uri=f"tcp:{host}:{port}")
            t0 = time.monotonic()
            q.cmd("migrate", uri=f"tcp:{host}:{port}")
            st = self.poll_migration(q, timeout, [src, dst])
            t_src = time.monotonic() - t0
            if st["status"] != "completed":
                raise BenchError(f"QEMU source: migration {st['status']}: {st.get('error-desc')}")
            ram = st.get("ram", {})
            row: dict[str, Any] = {
                "method": method,
                "channels": channels,
                "total_ms": st["total-time"],
                "setup_ms": st.get("setup-time"),
                "downtime_ms": st.get("downtime"),
                "source_poll_s": t_src,
                "transferred": ram.get("transferred"),
                "normal_pages": ram.get("normal"),
                "duplicate_pages": ram.get("duplicate"),
                "multifd_bytes": ram.get("multifd-bytes"),
            }
            if to_save:
                self.children.wait([dst], timeout)
                assert dst.ended is not None
                if dst.status != 0:
                    raise BenchError(dst.describe_failure())
                sj = json.loads((d / "save.json").read_text())
                row.update(
                    save_exit_s=dst.ended - t0,
                    save_lib_s=sj["seconds"],
                    save_cpu_s=dst.cpu_seconds,
                    save_rss=dst.max_rss_bytes,
                    save_wire_bytes=sj["ram"]["transferred"],
                )
                if self.cfg.verify:
                    ram_block = [b for b in sj["blocks"] if b["name"] == "pc.ram"]
                    ok = bool(ram_block) and files_equal(
                        d / "snap" / ram_block[0]["file"],
                        self.images.pattern,
                        LOAD_GUEST_ADDR,
                        self.cfg.pattern_size,
                    )
                    row["verified"] = ok
                    if not ok:
                        self.note(f"qemu-save {method} {channels}ch: pc.ram differs (BUG?)")
            else:
                assert dq is not None
                dst_st = self.poll_migration(dq, 60, [dst])
                row["dst_status"] = dst_st["status"]
                if dst_st["status"] != "completed":
                    raise BenchError(f"QEMU destination: migration {dst_st['status']}")
            self.qemu_quit(q, src)
            q = None
            row["src_cpu_s_incl_startup"] = src.cpu_seconds
            if dq is not None and dst is not None:
                self.qemu_quit(dq, dst)
                dq = None
                row["dst_cpu_s_incl_startup"] = dst.cpu_seconds
            return row
        finally:
            for qq in (q, dq):
                if qq is not None:
                    qq.close()
            self.children.close()
            shutil.rmtree(d, ignore_errors=True)


# --- aggregation and comparisons ------------------------------------------------------------


def aggregate(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Median of every numeric field per configuration (``keys``), over the reps that worked."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, group in groups.items():
        ok = [r for r in group if "error" not in r]
        agg: dict[str, Any] = dict(zip(keys, key, strict=True))
        agg["reps_ok"] = len(ok)
        agg["reps"] = len(group)
        if len(ok) < len(group):
            agg["errors"] = [r["error"] for r in group if "error" in r]
        fields = {f for r in ok for f, v in r.items() if f not in keys and f != "rep"}
        for f in sorted(fields):
            vals = [r.get(f) for r in ok]
            if all(isinstance(v, bool) or v is None for v in vals):
                agg[f] = None if all(v is None for v in vals) else all(v is not False for v in vals)
            elif all(isinstance(v, int | float) or v is None for v in vals):
                agg[f] = median(vals)
            else:
                agg[f] = vals[0]
        out.append(agg)
    return out


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The aggregated row of one configuration (it may have no successful rep)."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def failed(*rows: dict[str, Any] | None) -> str | None:
    """Why a comparison cannot be made: a side not run, or all its reps failed."""
    for r in rows:
        if r is None:
            return "not measured in this run"
    for r in rows:
        assert r is not None
        if not r.get("reps_ok"):
            return "FAILED: " + "; ".join(r.get("errors", []))[:400]
    return None


Comparison = dict[str, Any]


def _comparison(
    target: str, what: str, ratio: float | None, ok: bool | None, detail: str
) -> Comparison:
    return {"target": target, "what": what, "ratio": ratio, "met": ok, "detail": detail}


def _cannot(target: str, what: str, why: str) -> Comparison:
    """A comparison not made: not measured (no verdict) or a side failed (not met)."""
    return _comparison(target, what, None, None if why.startswith("not") else False, why)


def comparisons(summary: dict[str, Any], cfg: Config) -> list[Comparison]:
    return [
        *_compare_with_qemu(summary, cfg),
        *_compare_with_iperf(summary, cfg),
        *_compare_with_codec(summary, cfg),
        *_compare_save_with_qemu(summary, cfg),
        *_compare_rss(summary, cfg),
    ]


def _compare_with_qemu(summary: dict[str, Any], cfg: Config) -> Iterator[Comparison]:
    """(a) Python -> Python faster than QEMU -> QEMU"""
    for method in QEMU_METHODS:
        for n in cfg.qemu_channels:
            p, q = (
                find(summary["python"], image="vm", method=method, channels=n),
                find(summary["qemu"], method=method, channels=n),
            )
            what = f"Python->Python / QEMU->QEMU time, {method} {n}ch"
            if why := failed(p, q):
                yield _cannot("a", what, why)
                continue
            assert p is not None and q is not None
            qs = q["total_ms"] / 1000
            # like for like: QEMU's total-time runs from `migrate` to completion on the source,
            # without process start; the sender's own migration time does the same
            lib = p["send_lib_s"]
            yield _comparison(
                "a",
                what,
                lib / qs,
                lib < qs,
                f"{lib:.3f} s / {qs:.3f} s  (with both processes' start and exit: "
                f"{p['wall_s']:.3f} s, {p['wall_s'] / qs:.2f}x)",
            )


def _compare_with_iperf(summary: dict[str, Any], cfg: Config) -> Iterator[Comparison]:
    """(b) nocomp >= 0.8x iperf3 with the same streams"""
    cases = [("vm", n) for n in cfg.channels] + [("random", 2)]
    for image, n in cases:
        p = find(summary["python"], image=image, method="none", channels=n)
        i = find(summary["iperf3"], streams=n)
        what = f"nocomp {image} {n}ch / iperf3 -P {n} throughput"
        if why := failed(p, i):
            yield _cannot("b", what, why)
            continue
        assert p is not None and i is not None
        # iperf3 reports its transfer, without process start: so does the sender's own time
        lib = p.get("nonzero_GBps_lib") or p["nonzero_GBps"]
        r = lib / i["GBps"]
        yield _comparison(
            "b",
            what,
            r,
            r >= 0.8,
            f"{lib:.2f} / {i['GBps']:.2f} GB/s  (with process start and exit: "
            f"{p['nonzero_GBps']:.2f} GB/s, {p['nonzero_GBps'] / i['GBps']:.2f}x)",
        )


def _compare_with_codec(summary: dict[str, Any], cfg: Config) -> Iterator[Comparison]:
    """(c) compressed end-to-end >= 1.7x the codec's single-thread compress speed"""
    for method in CODEC_METHODS:
        for n in cfg.channels:
            p = find(summary["python"], image="vm", method=method, channels=n)
            c = find(summary["codec"], method=method)
            what = f"{method} {n}ch end-to-end / single-thread compress"
            why = failed(p, c) or (None if c and c.get("compress_MBps") else "no codec figure")
            if why:
                yield _cannot("c", what, why)
                continue
            assert p is not None and c is not None
            single = c["compress_MBps"] / 1000
            lib = p.get("nonzero_GBps_lib") or p["nonzero_GBps"]
            r = lib / single
            detail = (
                f"{lib:.3f} / {single:.3f} GB/s  (with process start and exit: "
                f"{p['nonzero_GBps']:.3f} GB/s, {p['nonzero_GBps'] / single:.2f}x)"
            )
            detail += _codec_bound(c, lib, single)
            if n < 2:
                detail += "  [1 channel: shown for reference, not a target]"
            yield _comparison("c", what, r, (r >= 1.7) if n >= 2 else None, detail)


def _codec_bound(c: dict[str, Any], lib: float, single: float) -> str:
    if not c.get("decompress_MBps"):
        return ""
    # both ends on this machine's cores: every byte is compressed and decompressed on them, so
    # even with no other work the pair moves at most this fast
    cores = os.cpu_count() or 1
    bound = cores / (1 / c["compress_MBps"] + 1 / c["decompress_MBps"]) / 1000
    return (
        f"  [{cores} cores shared by both ends: codec work alone bounds it at "
        f"{bound:.3f} GB/s = {bound / single:.2f}x; reached {lib / bound:.0%} of that]"
    )


def _compare_save_with_qemu(summary: dict[str, Any], cfg: Config) -> Iterator[Comparison]:
    """(d) QEMU -> qemu-save no slower than QEMU -> QEMU"""
    for method in QEMU_METHODS:
        for n in cfg.qemu_channels:
            s = find(summary["qemu_save"], method=method, channels=n)
            q = find(summary["qemu"], method=method, channels=n)
            what = f"QEMU->qemu-save / QEMU->QEMU time, {method} {n}ch"
            if why := failed(s, q):
                yield _cannot("d", what, why)
                continue
            assert s is not None and q is not None
            yield _comparison(
                "d",
                what,
                s["total_ms"] / q["total_ms"],
                s["total_ms"] <= q["total_ms"],
                f"{s['total_ms']:.0f} ms / {q['total_ms']:.0f} ms (source total-time; qemu-save "
                f"exited {s['save_exit_s']:.3f} s after migrate)",
            )


def _compare_rss(summary: dict[str, Any], cfg: Config) -> Iterator[Comparison]:
    """(e) peak RSS of each end <= image + 64 MiB"""
    for p in summary["python"]:
        if not p.get("reps_ok"):
            continue
        limit = p["image_bytes"] + RSS_SLACK
        worst = max(p["send_rss"], p["recv_rss"])
        yield _comparison(
            "e",
            f"peak RSS {p['image']} {p['method']} {p['channels']}ch / (image + 64 MiB)",
            worst / limit,
            worst <= limit,
            f"send {p['send_rss'] / MiB:.0f} MiB, recv {p['recv_rss'] / MiB:.0f} MiB, "
            f"limit {limit / MiB:.0f} MiB",
        )
    for s in summary["qemu_save"]:
        if s.get("save_rss"):
            limit = cfg.image_size + RSS_SLACK
            yield _comparison(
                "e",
                f"peak RSS qemu-save {s['method']} {s['channels']}ch / (guest RAM + 64 MiB)",
                s["save_rss"] / limit,
                s["save_rss"] <= limit,
                f"{s['save_rss'] / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB (informative: the "
                "guest has a few small RAM blocks besides pc.ram)",
            )


# --- report -------------------------------------------------------------------------------


def fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def report(doc: dict[str, Any]) -> str:
    meta, summary = doc["meta"], doc["summary"]
    out = _report_head(meta)
    if summary["python"]:
        out += _report_python(summary)
    if summary.get("integrity"):
        out += _report_integrity(summary)
    if summary["iperf3"]:
        out += _report_iperf(summary)
    if summary["qemu"] or summary["qemu_save"]:
        out += _report_qemu(meta, summary)
    if summary["codec"]:
        out += _report_codec(summary)
    out += _report_comparisons(doc)
    if doc["notes"]:
        out += ["", "Notes"] + [f"  - {n}" for n in doc["notes"]]
    return "\n".join(out)


def _report_head(meta: dict[str, Any]) -> list[str]:
    img = meta["images"].get("vm", {})
    out = [
        f"multifd benchmark  {meta['date']}  {'--quick' if meta['quick'] else 'full'}, "
        f"{meta['reps']} rep(s), medians  (load {meta['load_before']} -> {meta['load_after']}, "
        f"{meta['cpus']} CPUs)",
    ]
    if img:
        line = (
            f"VM-like image {img['size'] // MiB} MiB: {img['pattern'] // MiB} MiB pattern "
            f"({img['nonzero_bytes'] / MiB:.0f} MiB non-zero), rest zero"
        )
        for kind in ("random", "zero"):
            if kind in meta["images"]:
                line += f";  all-{kind} {meta['images'][kind]['size'] // MiB} MiB"
        out.append(line)
    return out


def _report_python(summary: dict[str, Any]) -> list[str]:
    out = [
        "",
        "Python -> Python, loopback TCP, two processes (wall = send start -> both exited)",
    ]
    rows = []
    for r in summary["python"]:
        if not r["reps_ok"]:
            rows.append([r["image"], r["method"], str(r["channels"]), "FAILED"] + [""] * 10)
            continue
        rows.append(
            [
                r["image"],
                r["method"],
                str(r["channels"]),
                fmt(r["wall_s"]),
                fmt(r["send_lib_s"]),
                fmt(r["nonzero_GBps"], ".2f"),
                fmt(r["image_GBps"], ".2f"),
                fmt(r["wire_bytes"] / MiB, ".1f"),
                fmt(r["send_cpu_s"], ".2f"),
                fmt(r["recv_cpu_s"], ".2f"),
                fmt(r["send_rss"] / MiB, ".0f"),
                fmt(r["recv_rss"] / MiB, ".0f"),
                fmt(r.get("verified")),
                f"{r['reps_ok']}/{r['reps']}",
            ]
        )
    headers = ["image", "method", "ch", "wall s", "lib s", "nz GB/s", "img GB/s", "wire MiB"]
    headers += ["cpu snd", "cpu rcv", "rss snd", "rss rcv", "same", "reps"]
    out.append(table(headers, rows))
    st = summary["startup"]
    if st["wall_s"] is not None:
        out.append(
            f"(a multifd process's fixed cost, `multifd plugins --json`: {st['wall_s']:.3f} s "
            f"wall, {st['cpu_s']:.2f} CPU-s, {st['rss'] / MiB:.0f} MiB; wall includes one "
            "such start for send; lib s = the sender's own migration time from its JSON)"
        )
    return out


def _report_integrity(summary: dict[str, Any]) -> list[str]:
    """Packet checksums (on by default) and --verify against the same migration without them,
    as ratios of this run's medians."""
    out = [
        "",
        "Integrity: the vm image, 2 channels, checksums off / on / on + --verify (ratio to off)",
    ]
    rows = []
    for method in INTEGRITY_METHODS:
        off = find(summary["integrity"], method=method, integrity="off")
        for mode in INTEGRITY_MODES:
            r = find(summary["integrity"], method=method, integrity=mode)
            if r is None:
                continue
            if not r["reps_ok"] or off is None or not off["reps_ok"]:
                rows.append([method, mode, "FAILED", *[""] * 6])
                continue

            def ratio(key: str, r: dict[str, Any] = r, off: dict[str, Any] = off) -> str:
                return fmt(r[key] / off[key], ".3f") if off.get(key) else "-"

            cpu = r["send_cpu_s"] + r["recv_cpu_s"]
            cpu_off = off["send_cpu_s"] + off["recv_cpu_s"]
            rows.append(
                [
                    method,
                    mode,
                    fmt(r["wall_s"]),
                    ratio("wall_s"),
                    fmt(r["send_lib_s"]),
                    ratio("send_lib_s"),
                    fmt(cpu, ".2f"),
                    fmt(cpu / cpu_off if cpu_off else None, ".3f"),
                    f"{r['reps_ok']}/{r['reps']}",
                ]
            )
    headers = ["method", "mode", "wall s", "x off", "lib s", "x off", "cpu s", "x off", "reps"]
    out.append(table(headers, rows))
    return out


def _report_iperf(summary: dict[str, Any]) -> list[str]:
    rows = [
        [str(r["streams"]), fmt(r.get("GBps"), ".2f"), f"{r['reps_ok']}/{r['reps']}"]
        for r in summary["iperf3"]
    ]
    return ["", "iperf3, loopback, -n image size", table(["streams", "GB/s", "reps"], rows)]


def _report_qemu(meta: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"QEMU 7.2 source (guest -m {meta['guest_mib']}M, pattern at {LOAD_GUEST_ADDR:#x});"
        " time = source total-time",
    ]
    rows = []
    for pair, key in (("QEMU->QEMU", "qemu"), ("QEMU->qemu-save", "qemu_save")):
        for r in summary[key]:
            rows.append(_qemu_row(pair, key == "qemu_save", r))
    headers = ["pair", "method", "ch", "total ms", "wire MiB", "save exit s", "cpu save"]
    headers += ["rss save", "same", "reps"]
    out.append(table(headers, rows))
    return out


def _qemu_row(pair: str, save: bool, r: dict[str, Any]) -> list[str]:
    reps = f"{r['reps_ok']}/{r['reps']}"
    if not r["reps_ok"]:
        return [pair, r["method"], str(r["channels"]), "FAILED", *[""] * 5, reps]
    return [
        pair,
        r["method"],
        str(r["channels"]),
        fmt(r.get("total_ms"), ".0f"),
        fmt((r.get("transferred") or 0) / MiB, ".1f"),
        fmt(r.get("save_exit_s")) if save else "-",
        fmt(r.get("save_cpu_s"), ".2f") if save else "-",
        fmt((r.get("save_rss") or 0) / MiB, ".0f") if save else "-",
        fmt(r.get("verified")) if save else "-",
        reps,
    ]


def _report_codec(summary: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["method"],
            fmt(r.get("compress_MBps"), ".0f"),
            fmt(r.get("decompress_MBps"), ".0f"),
            fmt(r.get("ratio"), ".2f"),
            fmt(r.get("roundtrip_ok")),
        ]
        for r in summary["codec"]
    ]
    return [
        "",
        "Codecs, one thread, packets of 128 pages, the pattern's non-zero pages",
        table(["method", "compress MB/s", "decompress MB/s", "ratio", "same"], rows),
    ]


COMPARISON_TITLES = {
    "a": "(a) Python->Python faster than QEMU->QEMU (ratio < 1)",
    "b": "(b) nocomp >= 0.8x iperf3, same streams",
    "c": "(c) compressed end-to-end >= 1.7x the codec's single-thread compress",
    "d": "(d) QEMU->qemu-save <= QEMU->QEMU time (ratio <= 1)",
    "e": "(e) peak RSS of each end <= image + 64 MiB (ratio <= 1)",
}
#: The sections each comparison needs.
COMPARISON_NEEDS = {
    "a": ("python", "qemu"),
    "b": ("python", "iperf3"),
    "c": ("python", "codec"),
    "d": ("qemu", "qemu-save"),
    "e": ("python",),
}


def _report_comparisons(doc: dict[str, Any]) -> list[str]:
    out = ["", "Comparisons (ratios from this run)"]
    for target, title in COMPARISON_TITLES.items():
        lines = [c for c in doc["comparisons"] if c["target"] == target]
        missing = [s for s in COMPARISON_NEEDS[target] if s not in doc["meta"]["sections"]]
        if missing:
            out.append(f"{title}: not run (needs section(s) {', '.join(COMPARISON_NEEDS[target])})")
            lines = [c for c in lines if c["ratio"] is not None]
        elif not lines:
            continue
        else:
            out.append(title)
        for c in lines:
            mark = {True: "MET", False: "NOT MET", None: "-"}[c["met"]]
            ratio = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "n/a"
            out.append(f"  {mark:<8} {ratio:>7}  {c['what']}: {c['detail']}")
    return out


# --- main ---------------------------------------------------------------------------------


def find_multifd(explicit: str | None) -> str:
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise SystemExit(f"bench: --multifd {explicit}: not an executable file")
        return explicit
    beside = Path(sys.executable).with_name("multifd")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("multifd")
    if found:
        return found
    raise SystemExit(
        "bench: the `multifd` command is not installed (looked next to "
        f"{sys.executable} and on PATH). Install the project first, e.g.\n"
        "  python3 -m venv .venv && .venv/bin/pip install -e . -e ./plugins/multifd_zlib "
        "-e ./plugins/multifd_zstd -e ./plugins/multifd_lz4\n"
        "then run: .venv/bin/python bench/run.py --quick"
    )


def installed_methods(multifd: str) -> tuple[list[str], list[str]]:
    try:
        proc = subprocess.run(
            [multifd, "plugins", "--json"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"bench: `{multifd} plugins --json` failed: {exc}") from None
    if proc.returncode != 0:
        raise SystemExit(f"bench: `{multifd} plugins --json` failed: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    return [m["name"] for m in data["methods"]], list(data.get("problems", []))


def tool_version(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else None


def git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="multifd benchmark suite (see bench/README.md)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 rep, 256 MiB image (128 MiB pattern), 2 channels only",
    )
    p.add_argument("--reps", type=int, help="repetitions per configuration (default 3; quick 1)")
    p.add_argument("--json", metavar="FILE", help="write the JSON document here")
    p.add_argument(
        "--only",
        metavar="SECTION,...",
        help=f"run only these sections: {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not compare received images with the source (saves ~0.5 s per GiB per run)",
    )
    p.add_argument("--multifd", metavar="PATH", help="the multifd command (default: beside python)")
    p.add_argument(
        "--workdir",
        metavar="DIR",
        default="/dev/shm",
        help="where images and received files go (default /dev/shm, a tmpfs)",
    )
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    if args.only:
        chosen = tuple(s.strip() for s in args.only.split(",") if s.strip())
        bad = [s for s in chosen if s not in SECTIONS]
        if bad or not chosen:
            p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
        args.sections = tuple(s for s in SECTIONS if s in chosen)
    else:
        args.sections = SECTIONS
    return args


def remove_stale_workdirs(bench: Bench, parent: Path) -> None:
    """Remove work directories left by a run that was killed (its pid no longer exists)."""
    for d in parent.glob("multifd-bench-*"):
        try:
            pid = int((d / "pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        bench.note(f"removed {d}, left by a killed run (pid {pid})")


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # run the finally blocks: children ended, images removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    multifd = find_multifd(args.multifd)
    methods, problems = installed_methods(multifd)
    quick = args.quick
    cfg = Config(
        quick=quick,
        reps=args.reps or (1 if quick else 3),
        image_size=256 * MiB if quick else GiB,
        pattern_size=128 * MiB if quick else 512 * MiB,
        random_size=256 * MiB if quick else GiB,
        zero_size=256 * MiB if quick else GiB,
        channels=(2,) if quick else (1, 2, 4),
        qemu_channels=(2,) if quick else (2, 4),
        sections=args.sections,
        verify=args.verify,
        workdir_parent=Path(args.workdir),
        multifd=multifd,
        qemu=shutil.which("qemu-system-x86_64"),
        iperf3=shutil.which("iperf3"),
        methods=tuple(m for m in PY_METHODS if m in methods),
    )
    bench = Bench(cfg)
    for problem in problems:
        bench.note(f"multifd plugins: {problem}")
    if not cfg.workdir_parent.is_dir():
        raise SystemExit(f"bench: --workdir {cfg.workdir_parent} is not a directory")
    started = time.monotonic()
    load_before = load_average()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "reps": cfg.reps,
        "sections": list(cfg.sections),
        "image_size": cfg.image_size,
        "pattern_size": cfg.pattern_size,
        "guest_mib": cfg.guest_mib,
        "channels": list(cfg.channels),
        "qemu_channels": list(cfg.qemu_channels),
        "qemu_max_bandwidth": QEMU_MAX_BANDWIDTH,
        "methods": list(cfg.methods),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "multifd": multifd,
        "multifd_version": tool_version([multifd, "--version"]),
        "git_commit": git_commit(),
        "qemu": tool_version([cfg.qemu, "--version"]) if cfg.qemu else None,
        "iperf3": tool_version([cfg.iperf3, "--version"]) if cfg.iperf3 else None,
        "load_before": load_before,
    }
    if load_before is not None and load_before >= 1.5:
        bench.note(f"load average {load_before:.2f} at the start: figures may be noisy")
    remove_stale_workdirs(bench, cfg.workdir_parent)
    workdir = Path(tempfile.mkdtemp(prefix="multifd-bench-", dir=cfg.workdir_parent))
    (workdir / "pid").write_text(str(os.getpid()))
    interrupted = False
    try:
        bench.make_images(workdir)
        steps: dict[str, Callable[[], None]] = {
            "codec": bench.section_codec,
            "iperf3": bench.section_iperf3,
            "python": bench.section_python,
            "integrity": bench.section_integrity,
            "qemu": lambda: bench.section_qemu(False),
            "qemu-save": lambda: bench.section_qemu(True),
        }
        for section in cfg.sections:
            try:
                steps[section]()
            except BenchError as exc:
                bench.note(f"{section}: stopped: {exc}")
            except Exception:
                bench.note(f"{section}: crashed:\n{traceback.format_exc()}")
    except KeyboardInterrupt:
        interrupted = True
        bench.note("interrupted: the figures below are partial")
    except BenchError as exc:
        bench.note(f"stopped: {exc}")
    finally:
        bench.children.close()
        shutil.rmtree(workdir, ignore_errors=True)
    meta["images"] = bench.images.info if bench.images else {}
    meta["load_after"] = load_average()
    meta["seconds"] = round(time.monotonic() - started, 1)
    summary = {
        "python": aggregate(bench.doc["python"], ("image", "method", "channels")),
        "integrity": aggregate(bench.doc["integrity"], ("method", "channels", "integrity")),
        "iperf3": aggregate(bench.doc["iperf3"], ("streams",)),
        "qemu": aggregate(bench.doc["qemu"], ("method", "channels")),
        "qemu_save": aggregate(bench.doc["qemu_save"], ("method", "channels")),
        "codec": aggregate(bench.doc["codec"], ("method",)),
        "startup": {
            "wall_s": median(r["wall_s"] for r in bench.doc["startup"]),
            "cpu_s": median(r["cpu_s"] for r in bench.doc["startup"]),
            "rss": median(r["rss"] for r in bench.doc["startup"]),
        },
    }
    doc: dict[str, Any] = {"meta": meta, "summary": summary, "runs": bench.doc}
    doc["comparisons"] = comparisons(summary, cfg)
    doc["notes"] = bench.notes
    if args.json:
        json_path = Path(args.json)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = Path(tempfile.gettempdir()) / f"multifd-bench-{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc))
    print(f"\nJSON: {json_path}   ({meta['seconds']} s in all)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
