"""Workload images and the single-thread codec measurement, run in their own processes.

They run as ``python bench/workload.py ...`` so that the benchmark's own process stays small: on
Linux a child's ``ru_maxrss`` starts from the peak RSS of the process that forked it, and the
children's peak RSS is one of the figures.

    workload.py gen-vm PATH SIZE PATTERN [--pattern-file PAT] [--seed N]
                                                    VM-like PATTERN bytes, rest zero
    workload.py gen-random PATH SIZE                            random bytes
    workload.py gen-zero PATH SIZE                              zero bytes (allocated, not a hole)
    workload.py codec PATH PATTERN METHOD...                    codec MB/s on the non-zero pages

Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import sys
import time
from typing import Any

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
PACKET_PAGES = 128  # pages per multifd packet, as the library and QEMU cut them
CHUNK = 16 << 20


def gen_vm(
    path: str, size: int, pattern: int, pattern_file: str | None, seed: int = 0
) -> dict[str, Any]:
    from multifd_core.image import fill_vm_like, page_kind

    t0 = time.monotonic()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        # the pattern part is allocated memory (zeros included), the rest a hole: like a guest
        # whose loader wrote PATTERN bytes and whose other RAM was never touched
        os.posix_fallocate(fd, 0, pattern)
        with mmap.mmap(fd, pattern) as m:
            view = memoryview(m)
            fill_vm_like(view, PAGE, seed=seed)
            view.release()
    finally:
        os.close(fd)
    if pattern_file:
        with open(path, "rb") as src, open(pattern_file, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
            dst.truncate(pattern)
    nonzero = sum(page_kind(i, seed) != "zero" for i in range(pattern // PAGE))
    return {
        "size": size,
        "pattern": pattern,
        "nonzero_pages": nonzero,
        "nonzero_bytes": nonzero * PAGE,
        "seconds": round(time.monotonic() - t0, 3),
    }


def gen_random(path: str, size: int) -> dict[str, Any]:
    t0 = time.monotonic()
    rng = random.Random(12345)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(rng.randbytes(n))
            left -= n
    return {"size": size, "nonzero_bytes": size, "seconds": round(time.monotonic() - t0, 3)}


def gen_zero(path: str, size: int) -> dict[str, Any]:
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)  # allocated zero pages, like a guest that zeroed its RAM
    finally:
        os.close(fd)
    return {"size": size, "nonzero_bytes": 0, "seconds": round(time.monotonic() - t0, 3)}


def codec(path: str, pattern: int, methods: list[str]) -> dict[str, Any]:
    """Compress then decompress every non-zero page of the pattern in packets of 128 pages, in
    this one thread, through the plugin's SendContext / RecvContext (one context each, like one
    channel). Only the codec calls are timed; each packet is checked after its decompression."""
    from multifd_core import load_methods

    data = bytearray(pattern)
    with open(path, "rb") as f:
        got = f.readinto(data)
    if got != pattern:
        raise SystemExit(f"{path}: short read ({got} of {pattern} bytes)")
    view = memoryview(data)
    pages = [
        view[o : o + PAGE] for o in range(0, pattern, PAGE) if not data.startswith(ZERO_PAGE, o)
    ]
    packets = [pages[i : i + PACKET_PAGES] for i in range(0, len(pages), PACKET_PAGES)]
    raw = len(pages) * PAGE
    registry = load_methods()
    out: dict[str, Any] = {"pages": len(pages), "bytes": raw, "methods": {}}
    target = bytearray(PACKET_PAGES * PAGE)  # touched once: no page faults in the timed part
    target[:] = b"\x01" * len(target)
    tview = memoryview(target)
    tpages = [tview[o : o + PAGE] for o in range(0, len(target), PAGE)]
    for name in methods:
        try:
            method = registry.create(name)
        except Exception as exc:
            out["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        send = method.send_setup(0)
        payloads: list[bytes] = []
        t_comp = 0.0
        try:
            for packet in packets:
                t = time.perf_counter()
                parts = send.send_prepare(packet)
                t_comp += time.perf_counter() - t
                payloads.append(b"".join(parts))
        finally:
            send.send_cleanup()
        recv = method.recv_setup(0)
        t_dec = 0.0
        ok = True
        try:
            for packet, payload in zip(packets, payloads, strict=True):
                dst = tpages[: len(packet)]
                t = time.perf_counter()
                recv.recv_pages(memoryview(payload), dst)
                t_dec += time.perf_counter() - t
                n = len(packet) * PAGE
                if ok and target[:n] != b"".join(packet):
                    ok = False
        finally:
            recv.recv_cleanup()
        wire = sum(len(p) for p in payloads)
        out["methods"][name] = {
            "compress_seconds": round(t_comp, 6),
            "decompress_seconds": round(t_dec, 6),
            "compress_MBps": round(raw / t_comp / 1e6, 1) if t_comp else None,
            "decompress_MBps": round(raw / t_dec / 1e6, 1) if t_dec else None,
            "payload_bytes": wire,
            "ratio": round(raw / wire, 3) if wire else None,
            "roundtrip_ok": ok,
        }
        payloads.clear()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen-vm")
    g.add_argument("path")
    g.add_argument("size", type=int)
    g.add_argument("pattern", type=int)
    g.add_argument("--pattern-file")
    g.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("gen-random")
    g.add_argument("path")
    g.add_argument("size", type=int)
    g = sub.add_parser("gen-zero")
    g.add_argument("path")
    g.add_argument("size", type=int)
    g = sub.add_parser("codec")
    g.add_argument("path")
    g.add_argument("pattern", type=int)
    g.add_argument("methods", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "gen-vm":
        result = gen_vm(args.path, args.size, args.pattern, args.pattern_file, args.seed)
    elif args.cmd == "gen-random":
        result = gen_random(args.path, args.size)
    elif args.cmd == "gen-zero":
        result = gen_zero(args.path, args.size)
    else:
        result = codec(args.path, args.pattern, args.methods)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
