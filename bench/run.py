#!/usr/bin/env python3
"""The multifd benchmark suite: one command, one run, every comparison as a ratio of that run.

    .venv/bin/python bench/run.py [--quick] [--reps N] [--json FILE] [--only SECTION,...]

Sections: launch (fresh processes' start-up), codec (each codec in one thread), iperf3, python
(Python -> Python over loopback, two processes), integrity (packet checksums and --verify), demo
(``multifd demo`` against send -> recv), qemu (QEMU 7.2 -> QEMU 7.2), qemu-save (QEMU 7.2 ->
``multifd qemu-save``). See bench/README.md for what every figure means. Nothing here asserts on
time: it measures and reports; targets.py marks each target MET / NOT MET, report.py prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import Config, GiB, Images, MiB, files_equal, load_average, log
from procs import (
    BenchError,
    Child,
    Children,
    free_port,
    wait_for_listen,
    wait_for_ready_file,
)
from qemu_runs import QEMU_MAX_BANDWIDTH, QemuRuns
from report import report
from summary import summarize
from targets import CODEC_METHODS, QEMU_BEST_OF, QEMU_CHANNELS, QEMU_METHODS, comparisons

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("launch", "codec", "iperf3", "python", "integrity", "demo", "qemu", "qemu-save")
PY_METHODS = ("none", "zlib", "zstd", "lz4")
INTEGRITY_METHODS = ("none", "zstd")
#: integrity section: mode -> (send's options, recv's options); packet checksums are on by default
INTEGRITY_MODES = {
    "off": (["--no-integrity"], []),
    "on": ([], []),
    "on+verify": (["--verify"], ["--verify"]),
}
#: demo section: (image size, method, channels) of a full run, and of --quick
DEMO_CONFIGS = ((256 * MiB, "none", 2), (GiB, "zstd", 2))
DEMO_CONFIGS_QUICK = ((256 * MiB, "none", 2),)
DEMO_BIOS = 256 << 10  # the demo's second block (pc.bios), sent as a second file by `send`
LAUNCH_REPS, LAUNCH_REPS_QUICK = 10, 5  # fresh processes per launch command


class Bench(QemuRuns):
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
        if "demo" in cfg.sections:
            for size in sorted({size for size, _, _ in cfg.demo_configs}):
                self.make_demo_image(size)

    def make_demo_image(self, size: int) -> None:
        """What `multifd demo --size SIZE` migrates: a VM-like pc.ram over all of SIZE, and a
        VM-like pc.bios of 256 KiB (the same generator; seeds 1 and 2, as the demo's)."""
        assert self.images is not None
        d = self.images.workdir / f"demo-{size}"
        d.mkdir()
        files = [d / "pc.ram", d / "pc.bios"]
        log(f"workload: demo-like image {size // MiB} MiB + {DEMO_BIOS >> 10} KiB")
        for path, n, seed in ((files[0], size, 1), (files[1], min(DEMO_BIOS, size), 2)):
            info = self.helper(
                "gen-vm", str(path), str(n), str(n), "--seed", str(seed), timeout=600
            )
            self.images.info[f"demo-{size}-{path.name}"] = info
        self.images.demo[size] = files

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

    def python_matrix(self) -> list[tuple[str, str, int, int]]:
        """(image, method, channels, reps): the configurations compared with QEMU run
        ``best_reps`` times (their best rep is compared), the others ``reps``."""
        cfg = self.cfg

        def reps(method: str, n: int) -> int:
            vs_qemu = method in QEMU_METHODS and n in cfg.qemu_channels
            return max(cfg.reps, cfg.best_reps) if vs_qemu else cfg.reps

        cases = [("vm", m, n, reps(m, n)) for m in cfg.methods for n in cfg.channels]
        if "none" in cfg.methods:
            cases += [(image, "none", 2, cfg.reps) for image in ("random", "zero", "zero+multifd")]
        return cases

    def section_python(self) -> None:
        missing = [m for m in PY_METHODS if m not in self.cfg.methods]
        if missing:
            self.note(f"python: method(s) not installed, skipped: {', '.join(missing)}")
        cases = self.python_matrix()
        for rep in range(max(c[3] for c in cases)):
            if rep < self.cfg.reps:
                self.startup_once(rep)
            for image, method, channels, reps in cases:
                tag = f"python {image} {method} {channels}ch rep {rep + 1}/{reps}"
                if rep >= reps or ("python", image, method, channels) in self.broken:
                    continue  # done, or failed in an earlier rep: not worth another timeout
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

    # --- launch: what a fresh process costs before it does anything ---------------------------

    def launch_commands(self) -> dict[str, list[str]]:
        """The launch section's commands; ``import`` and ``python`` use the interpreter that
        runs ``multifd`` (its script's ``#!`` line)."""
        py = script_python(self.cfg.multifd)
        return {
            "help": self.mf("--help"),
            "import": [py, "-c", "import multifd_core"],
            "python": [py, "-c", "pass"],  # a bare interpreter, for reference
        }

    def section_launch(self) -> None:
        assert self.images is not None
        commands = self.launch_commands()
        n = self.cfg.launch_reps
        log(f"launch: {n} fresh processes of each of {', '.join(commands)}")
        for rep in range(n):
            for what, argv in commands.items():  # interleaved: a drift in load hits each alike
                shown = shlex.join([Path(argv[0]).name, *argv[1:]])
                row: dict[str, Any] = {"what": what, "command": shown, "rep": rep}
                try:
                    child = self.children.spawn(
                        f"`{shown}`", argv, stderr=self.images.workdir / "launch.err"
                    )
                    self.children.wait([child], 60)
                    assert child.ended is not None
                    if child.status != 0:
                        raise BenchError(child.describe_failure())
                    row.update(wall_s=child.ended - child.started, cpu_s=child.cpu_seconds)
                    row["rss"] = child.max_rss_bytes
                except BenchError as exc:
                    row["error"] = str(exc)
                    self.note(f"launch {what} rep {rep + 1}/{n}: {exc}")
                finally:
                    self.children.close()
                self.doc["launch"].append(row)

    # --- demo: `multifd demo` against send -> recv of the same kind of image ------------------

    def section_demo(self) -> None:
        configs = [c for c in self.cfg.demo_configs if c[1] in self.cfg.methods]
        if len(configs) < len(self.cfg.demo_configs):
            self.note("demo: a configuration's method is not installed; skipped")
        for rep in range(self.cfg.reps):
            for size, method, channels in configs:
                for side in ("demo", "send"):  # side by side in each rep
                    tag = f"demo {side} {size // MiB} MiB {method} {channels}ch"
                    tag += f" rep {rep + 1}/{self.cfg.reps}"
                    if ("demo", side, size, method, channels) in self.broken:
                        continue
                    try:
                        if side == "demo":
                            row = self.demo_once(size, method, channels)
                        else:
                            row = self.python_once(f"demo-{size}", method, channels)
                    except BenchError as exc:
                        row = {"error": str(exc)}
                        self.note(f"{tag}: {exc}")
                        self.broken.add(("demo", side, size, method, channels))
                    row.update(side=side, size=size, method=method, channels=channels, rep=rep)
                    self.doc["demo"].append(row)
                    if "throughput_Bps" in row:
                        log(f"{tag}: {row['throughput_Bps'] / MiB:.0f} MiB/s of page data")

    def demo_once(self, size: int, method: str, channels: int) -> dict[str, Any]:
        """One `multifd demo --json` process: its own figures, and its wall, CPU and RSS."""
        assert self.images is not None
        d = self.run_dir(f"demo-{size}-{method}-{channels}")
        args = ["--size", str(size), "--channels", str(channels), "--compression", method]
        try:
            child = self.children.spawn(
                "multifd demo",
                self.mf("demo", *args, "--json", "--no-progress"),
                stdout=d / "demo.json",
                stderr=d / "demo.err",
            )
            self.children.wait([child], 120 + size / 5e6)
            assert child.ended is not None
            if child.status != 0:
                raise BenchError(child.describe_failure())
            j = json.loads((d / "demo.json").read_text())
            return {
                "seconds": j["seconds"],
                "throughput_Bps": j["throughput-bytes-per-second"],
                "nonzero_bytes": j["ram"]["normal-bytes"],
                "rounds": j["ram"]["dirty-sync-count"],
                "image_seconds": j.get("image-seconds"),
                "verify_seconds": j.get("verify-seconds"),
                "verified": j.get("verified"),
                "wall_s": child.ended - child.started,
                "cpu_s": child.cpu_seconds,
                "rss": child.max_rss_bytes,
            }
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
        """One send/recv pair; ``image`` is an image's name (``Images.files``), with ``+MODE``
        for a ``--zero-page-detection`` other than the default (``zero+multifd``); ``send_args``
        / ``recv_args``: more options of each end."""
        assert self.images is not None
        file_image, _, zero_mode = image.partition("+")
        srcs = self.images.files(file_image)
        size = sum(src.stat().st_size for src in srcs)
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
                self.mf(
                    "send", "--connect", f"{host}:{port}", *common, *zero, *more, *map(str, srcs)
                ),
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
            if self.cfg.verify:  # the receiver names each file after the sender's
                verified = all(files_equal(src, Path(rj["files"][src.name])) for src in srcs)
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
                "throughput_Bps": sj["throughput-bytes-per-second"],
                "wire_bytes": sj["ram"]["transferred"],
                "compression_ratio": sj.get("compression-ratio"),
                "send_cpu_s": send.cpu_seconds,
                "recv_cpu_s": recv.cpu_seconds,
                "send_user_s": send.user_seconds,
                "send_sys_s": send.sys_seconds,
                "recv_user_s": recv.user_seconds,
                "recv_sys_s": recv.sys_seconds,
                "send_rss": send.max_rss_bytes,
                "recv_rss": recv.max_rss_bytes,
                "verified": verified,
            }
        finally:
            self.children.close()
            shutil.rmtree(d, ignore_errors=True)


# --- main ---------------------------------------------------------------------------------


def script_python(script: str) -> str:
    """The interpreter a console script runs with (its ``#!`` line); ours when unreadable."""
    try:
        with open(script, "rb") as f:
            line = f.readline(512).decode(errors="replace")
    except OSError:
        return sys.executable
    words = line[2:].split() if line.startswith("#!") else []
    if words and Path(words[0]).name == "env" and len(words) > 1:
        found = shutil.which(words[1])
        return found or sys.executable
    if words and os.access(words[0], os.X_OK):
        return words[0]
    return sys.executable


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
    p.add_argument(
        "--best-of",
        type=int,
        metavar="N",
        help=f"reps of the configurations compared with QEMU, both sides (default {QEMU_BEST_OF}"
        "; quick: --reps)",
    )
    p.add_argument(
        "--channels",
        metavar="N,...",
        help="channel counts of the python and iperf3 sections (default 1,2,4,8; quick 2)",
    )
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
    if args.best_of is not None and args.best_of < 1:
        p.error("--best-of must be at least 1")
    if args.channels:
        try:
            args.channels = tuple(sorted({int(n) for n in args.channels.split(",") if n.strip()}))
        except ValueError:
            p.error(f"--channels: not a list of integers: {args.channels!r}")
        if not args.channels or min(args.channels) < 1:
            p.error("--channels: counts must be at least 1")
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
    reps = args.reps or (1 if quick else 3)
    cfg = Config(
        quick=quick,
        reps=reps,
        best_reps=args.best_of or (reps if quick else max(reps, QEMU_BEST_OF)),
        image_size=256 * MiB if quick else GiB,
        pattern_size=128 * MiB if quick else 512 * MiB,
        random_size=256 * MiB if quick else GiB,
        zero_size=256 * MiB if quick else GiB,
        channels=args.channels or ((2,) if quick else (1, 2, 4, 8)),
        qemu_channels=(2,) if quick else QEMU_CHANNELS,
        sections=args.sections,
        verify=args.verify,
        workdir_parent=Path(args.workdir),
        multifd=multifd,
        qemu=shutil.which("qemu-system-x86_64"),
        iperf3=shutil.which("iperf3"),
        methods=tuple(m for m in PY_METHODS if m in methods),
        demo_configs=DEMO_CONFIGS_QUICK if quick else DEMO_CONFIGS,
        launch_reps=LAUNCH_REPS_QUICK if quick else LAUNCH_REPS,
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
        "best_reps": cfg.best_reps,
        "launch_reps": cfg.launch_reps,
        "demo_configs": [list(c) for c in cfg.demo_configs],
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
            "launch": bench.section_launch,
            "demo": bench.section_demo,
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
    if meta["load_after"] is not None and meta["load_after"] >= 1.5:
        bench.note(f"load average {meta['load_after']:.2f} at the end: figures may be noisy")
    meta["seconds"] = round(time.monotonic() - started, 1)
    summary = summarize(bench.doc)
    doc: dict[str, Any] = {"meta": meta, "summary": summary, "runs": bench.doc}
    doc["comparisons"] = comparisons(summary, meta)
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
