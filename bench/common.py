"""What the benchmark's modules share: its configuration, its images, a few small helpers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
LOAD_GUEST_ADDR = 0x100000  # where -device loader puts the pattern in the guest


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    best_reps: int  # reps of the configurations compared with QEMU (best of both sides)
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
    demo_configs: tuple[tuple[int, str, int], ...] = ()
    launch_reps: int = 10

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
    demo: dict[int, list[Path]] = field(default_factory=dict)  # size -> the demo-like files
    info: dict[str, Any] = field(default_factory=dict)

    def files(self, name: str) -> list[Path]:
        """The files of image ``name``: ``vm``, ``random``, ``zero`` or ``demo-SIZE``."""
        if name.startswith("demo-"):
            return self.demo[int(name[5:])]
        path: Path | None = getattr(self, name)
        assert path is not None, name
        return [path]
