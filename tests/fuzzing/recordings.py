"""Wire constants the fuzzer shares, and its recording format (QEMU captures, failing cases)."""

from __future__ import annotations

import json
import lzma
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PS = 4096
HEADER = 1344
QEVM = b"QEVM"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
REC_MAGIC = b"MFDREC1\n"


def save_recording(path: Path, conns: Sequence[bytes], meta: dict[str, Any]) -> None:
    """lzma(``MFDREC1\\n`` + one JSON line {meta, lengths} + the connections' bytes)."""
    head = json.dumps({**meta, "lengths": [len(c) for c in conns]}).encode() + b"\n"
    path.write_bytes(lzma.compress(REC_MAGIC + head + b"".join(conns), preset=9))


def load_recording(path: Path) -> tuple[list[bytes], dict[str, Any]]:
    raw = lzma.decompress(path.read_bytes())
    if not raw.startswith(REC_MAGIC):
        raise ValueError(f"{path} is not a recording")
    nl = raw.index(b"\n", len(REC_MAGIC))
    meta = json.loads(raw[len(REC_MAGIC) : nl])
    pos = nl + 1
    conns = []
    for n in meta["lengths"]:
        conns.append(raw[pos : pos + n])
        pos += n
    return conns, meta
