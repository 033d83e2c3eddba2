"""One-off: record what a real QEMU 7.2 source sends when it migrates with multifd.

A small paused QEMU (``-m 16M``, q35, TCG) with a 256 KiB pattern loaded at 1 MiB of its RAM
migrates to a passive TCP listener here that accepts the main channel and every multifd
channel and stores each connection's bytes, read to EOF, in accept order (QEMU connects the
main channel first). QEMU never waits for the destination in precopy, so the migration
completes against the recorder. Each recording is written to ``tests/data`` as an
lzma-compressed file (see :func:`tests/fuzzing/recordings.py load_recording` for the format)::

    .venv/bin/python fuzz/record_qemu.py                     # none and zstd, 2 channels
    .venv/bin/python fuzz/record_qemu.py --method zlib --channels 1

The fuzzer replays these streams into our destination (``tests/fuzzing/``).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fuzzing as fh  # noqa: E402
import qemu_harness as qh  # noqa: E402

from multifd_core.image import vm_like_image  # noqa: E402

PATTERN_SIZE = 256 << 10
MEMORY = "16M"


class Recorder:
    """A TCP listener that accepts ``count`` connections and reads each one to EOF."""

    def __init__(self, count: int, timeout: float = 60.0) -> None:
        self.count = count
        self.timeout = timeout
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(count + 4)
        self.sock.settimeout(timeout)
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._acceptor = threading.Thread(target=self._accept_all, daemon=True)
        self._acceptor.start()

    def _accept_all(self) -> None:
        try:
            for _ in range(self.count):
                conn, _addr = self.sock.accept()
                buf = bytearray()
                self.conns.append(buf)
                t = threading.Thread(target=self._read_all, args=(conn, buf), daemon=True)
                t.start()
                self.threads.append(t)
        except BaseException as exc:  # reported by wait()
            self.errors.append(exc)

    def _read_all(self, conn: socket.socket, buf: bytearray) -> None:
        conn.settimeout(self.timeout)
        try:
            while chunk := conn.recv(1 << 20):
                buf += chunk
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def wait(self) -> list[bytes]:
        self._acceptor.join(self.timeout)
        for t in self.threads:
            t.join(self.timeout)
        self.sock.close()
        if self.errors:
            raise RuntimeError(f"recorder failed: {self.errors!r}")
        if len(self.conns) != self.count:
            raise RuntimeError(f"{len(self.conns)} of {self.count} connections arrived")
        return [bytes(c) for c in self.conns]


def qemu_version() -> str:
    out = subprocess.run(
        [qh.QEMU_BINARY, "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()[0]


def record(method: str, channels: int, out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="mfd-rec-") as tmp_name:
        tmp = Path(tmp_name)
        pattern = tmp / "pattern.bin"
        pattern.write_bytes(bytes(vm_like_image(PATTERN_SIZE, seed=11)))
        with qh.lab(tmp) as lab:
            loader = f"loader,file={pattern},addr={qh.PATTERN_ADDR:#x},force-raw=on"
            src = lab.qemu("src", "-device", loader, memory=MEMORY)
            src.set_multifd(channels, method)
            rec = Recorder(channels + 1)
            started = time.monotonic()
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{rec.port}")
            info = src.wait_migration(60)
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {src.log_tail()}")
            conns = rec.wait()
            elapsed = time.monotonic() - started
    meta = {
        "source": qemu_version(),
        "machine": "q35",
        "memory": MEMORY,
        "method": method,
        "channels": channels,
        "pattern": f"vm_like_image({PATTERN_SIZE}, seed=11) at {qh.PATTERN_ADDR:#x}",
        "seconds": round(elapsed, 3),
    }
    path = out_dir / f"qemu72-{method}-{channels}ch.rec.xz"
    fh.save_recording(path, conns, meta)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", action="append", choices=("none", "zlib", "zstd"))
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    args = ap.parse_args()
    if not qh.qemu_available():
        print(f"{qh.QEMU_BINARY} is not installed", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.method or ["none", "zstd"]:
        path = record(method, args.channels, args.out)
        conns, meta = fh.load_recording(path)
        sizes = [len(c) for c in conns]
        print(f"{path.name}: {path.stat().st_size} bytes compressed, connections {sizes}, {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
