"""The QEMU sections: QEMU 7.2 -> QEMU 7.2, and QEMU 7.2 -> ``multifd qemu-save``.

A mixin of run.py's ``Bench``: it uses the bench's configuration, images, children and notes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import LOAD_GUEST_ADDR, Config, GiB, Images, files_equal, log
from procs import BenchError, Child, Children, free_port
from qmp import QMP
from targets import QEMU_METHODS

QEMU_MAX_BANDWIDTH = 100 * GiB  # bytes/s for the QEMU source: unthrottled (default 128 MiB/s)


class QemuRuns:
    cfg: Config
    images: Images | None
    children: Children
    doc: dict[str, Any]
    broken: set[tuple[Any, ...]]

    if TYPE_CHECKING:  # Bench's

        def note(self, msg: str) -> None: ...

        def run_dir(self, tag: str) -> Path: ...

        def listen(
            self, name: str, d: Path, out: str, command: str, *args: str
        ) -> tuple[Child, str, int]: ...

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
        # QEMU -> QEMU: as many reps as the Python -> Python runs it is compared with (best of
        # each side); QEMU -> qemu-save: the run's reps (its medians are compared)
        reps = self.cfg.reps if to_save else max(self.cfg.reps, self.cfg.best_reps)
        for rep in range(reps):
            for method, channels in self.qemu_matrix():
                if to_save and method not in self.cfg.methods:
                    continue
                tag = f"{label} {method} {channels}ch rep {rep + 1}/{reps}"
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
