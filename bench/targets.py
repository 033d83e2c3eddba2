"""The benchmark's targets: each comparison of one run's figures with its threshold.

One job: judging. The thresholds are the named constants below, in one place (issue 15's
targets, and the earlier ones it keeps). The figures come from run.py's summary: one row per
configuration with the medians of its reps, ``reps_ok`` / ``reps``, ``errors`` when a rep failed
and ``min`` (each numeric field's smallest value over the reps that worked: the best time);
``meta`` gives what the run measured. :func:`comparisons` is a pure function of the JSON
document's ``summary`` and ``meta``, so a saved document can be judged again.

A comparison is ``{target, what, ratio, met, detail}``; ``met`` is True (MET), False (NOT MET:
below the threshold, or a side failed) or None (a line shown for reference, or a configuration
this run did not measure).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from common import MiB

# (a) Python -> Python no slower than QEMU 7.2 -> QEMU 7.2, the best rep of each side
QEMU_METHODS = ("none", "zlib", "zstd")
QEMU_CHANNELS = (2, 4)
QEMU_BEST_OF = 5  #: reps of these configurations, both sides, in a full run
PY_VS_QEMU_MAX = 1.0
# (b) nocomp page data throughput / iperf3 with as many streams
IPERF_CHANNELS = (2, 4)  #: judged on the VM-like image; other counts: reference
IPERF_RANDOM_CHANNELS = 2
NOCOMP_VS_IPERF_VM = 0.6
NOCOMP_VS_IPERF_RANDOM = 0.5
# (c) compressed end-to-end page data throughput / the codec's single-thread compress speed
CODEC_METHODS = ("zlib", "zstd", "lz4")
CODEC_CHANNELS = 2
CODEC_VS_SINGLE = {"zstd": 0.8, "lz4": 0.5}  #: zlib: shown for reference
# (d) QEMU -> qemu-save / QEMU -> QEMU source total-time (medians)
SAVE_VS_QEMU_MAX = 1.0
# (e) peak RSS of each end / (image + slack)
RSS_SLACK = 64 * MiB
# (f) adding channels never makes a migration slower: lib s ratio, each step of this ladder
SCALING_CHANNELS = (2, 4, 8)
SCALING_TOLERANCE = 0.05  #: run-to-run noise allowed: ratio <= 1 + this
# (g) a fresh process's wall time, median of the launch section's reps
LAUNCH_MAX_S = {"help": 0.25, "import": 0.15}
# (h) `multifd demo`'s page data throughput / send -> recv's, same image and settings
DEMO_VS_SEND = 0.8

TITLES = {
    "a": "(a) Python->Python no slower than QEMU 7.2->QEMU 7.2, best rep of each side "
    f"(ratio <= {PY_VS_QEMU_MAX:g})",
    "b": f"(b) nocomp >= {NOCOMP_VS_IPERF_VM:g}x iperf3 with the same streams at "
    f"{' and '.join(map(str, IPERF_CHANNELS))} channels (VM-like), >= "
    f"{NOCOMP_VS_IPERF_RANDOM:g}x on all-random",
    "c": f"(c) end-to-end at {CODEC_CHANNELS} channels vs the codec's single-thread compress: "
    + ", ".join(f"{m} >= {t:g}x" for m, t in CODEC_VS_SINGLE.items())
    + " (other methods / channels: reference)",
    "d": f"(d) QEMU->qemu-save <= QEMU->QEMU time (ratio <= {SAVE_VS_QEMU_MAX:g})",
    "e": f"(e) peak RSS of each end <= image + {RSS_SLACK // MiB} MiB (ratio <= 1)",
    "f": "(f) adding channels never makes a migration slower, "
    + " -> ".join(map(str, SCALING_CHANNELS))
    + f" (lib s ratio <= {1 + SCALING_TOLERANCE:g}: {SCALING_TOLERANCE:.0%} allowed for noise)",
    "g": "(g) start-up, median of fresh processes: "
    f"`multifd --help` <= {LAUNCH_MAX_S['help']:g} s, "
    f"`python -c 'import multifd_core'` <= {LAUNCH_MAX_S['import']:g} s",
    "h": f"(h) `multifd demo` page data throughput >= {DEMO_VS_SEND:g}x send->recv, same image "
    "and settings",
}
#: The sections each target needs.
NEEDS = {
    "a": ("python", "qemu"),
    "b": ("python", "iperf3"),
    "c": ("python", "codec"),
    "d": ("qemu", "qemu-save"),
    "e": ("python",),
    "f": ("python",),
    "g": ("launch",),
    "h": ("demo",),
}

Comparison = dict[str, Any]
Row = dict[str, Any]


def find(rows: list[Row], **match: Any) -> Row | None:
    """The summary row of one configuration (it may have no successful rep)."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def failed(*rows: Row | None) -> str | None:
    """Why a comparison cannot be made: a side not run, or all its reps failed."""
    for r in rows:
        if r is None:
            return "not measured in this run"
    for r in rows:
        assert r is not None
        if not r.get("reps_ok"):
            return "FAILED: " + "; ".join(r.get("errors", []))[:400]
    return None


def comparison(
    target: str, what: str, ratio: float | None, ok: bool | None, detail: str
) -> Comparison:
    return {"target": target, "what": what, "ratio": ratio, "met": ok, "detail": detail}


def cannot(target: str, what: str, why: str) -> Comparison:
    """A comparison not made: not measured (no verdict) or a side failed (not met)."""
    return comparison(target, what, None, None if why.startswith("not") else False, why)


def best(row: Row, key: str) -> Any:
    """The best (smallest) value of ``key`` over the row's reps; its median without ``min``."""
    return row.get("min", {}).get(key, row[key])


def comparisons(summary: dict[str, Any], meta: dict[str, Any]) -> list[Comparison]:
    return [
        *compare_with_qemu(summary),
        *compare_with_iperf(summary),
        *compare_with_codec(summary, meta),
        *compare_save_with_qemu(summary),
        *compare_rss(summary, meta),
        *compare_scaling(summary, meta),
        *compare_launch(summary),
        *compare_demo(summary),
    ]


def lib_GBps(p: Row) -> float:
    """Page data throughput over the sender's own migration time (GB/s, 1 GB = 1e9 B)."""
    return float(p.get("nonzero_GBps_lib") or p["nonzero_GBps"])


def compare_with_qemu(summary: dict[str, Any]) -> Iterator[Comparison]:
    """(a) Python -> Python no slower than QEMU -> QEMU: the best rep of each side (QEMU's
    times are bimodal: its fast mode against ours); the medians are in the detail."""
    for method in QEMU_METHODS:
        for n in QEMU_CHANNELS:
            p = find(summary["python"], image="vm", method=method, channels=n)
            q = find(summary["qemu"], method=method, channels=n)
            what = f"Python->Python / QEMU->QEMU time, {method} {n}ch"
            if why := failed(p, q):
                yield cannot("a", what, why)
                continue
            assert p is not None and q is not None
            # like for like: QEMU's total-time runs from `migrate` to completion on the source,
            # without process start; the sender's own migration time does the same
            lib, qs = best(p, "send_lib_s"), best(q, "total_ms") / 1000
            med_lib, med_qs = p["send_lib_s"], q["total_ms"] / 1000
            yield comparison(
                "a",
                what,
                lib / qs,
                lib / qs <= PY_VS_QEMU_MAX,
                f"best {lib:.3f} s / {qs:.3f} s (of {p['reps_ok']} / {q['reps_ok']} reps); "
                f"medians {med_lib:.3f} s / {med_qs:.3f} s = {med_lib / med_qs:.2f}x; with both "
                f"processes' start and exit (median) {p['wall_s']:.3f} s",
            )


def compare_with_iperf(summary: dict[str, Any]) -> Iterator[Comparison]:
    """(b) nocomp page data throughput / iperf3's with as many streams (medians)"""
    measured = sorted({r["channels"] for r in summary["python"] if r.get("image") == "vm"})
    cases: list[tuple[str, int, float | None]] = [
        ("vm", n, NOCOMP_VS_IPERF_VM) for n in IPERF_CHANNELS
    ]
    cases += [("vm", n, None) for n in measured if n not in IPERF_CHANNELS]
    cases += [("random", IPERF_RANDOM_CHANNELS, NOCOMP_VS_IPERF_RANDOM)]
    for image, n, threshold in cases:
        p = find(summary["python"], image=image, method="none", channels=n)
        i = find(summary["iperf3"], streams=n)
        what = f"nocomp {image} {n}ch / iperf3 -P {n} throughput"
        if why := failed(p, i):
            yield cannot("b", what, why)
            continue
        assert p is not None and i is not None
        # iperf3 reports its transfer, without process start: so does the sender's own time
        lib = lib_GBps(p)
        r = lib / i["GBps"]
        detail = (
            f"{lib:.2f} / {i['GBps']:.2f} GB/s  (with process start and exit: "
            f"{p['nonzero_GBps']:.2f} GB/s, {p['nonzero_GBps'] / i['GBps']:.2f}x)"
        )
        if threshold is None:
            detail += "  [reference, not a target]"
        yield comparison("b", what, r, None if threshold is None else r >= threshold, detail)


def compare_with_codec(summary: dict[str, Any], meta: dict[str, Any]) -> Iterator[Comparison]:
    """(c) compressed end-to-end page data throughput / the codec's single-thread compress"""
    measured = sorted({r["channels"] for r in summary["python"] if r.get("image") == "vm"})
    for method in CODEC_METHODS:
        threshold = CODEC_VS_SINGLE.get(method)
        for n in sorted({CODEC_CHANNELS, *measured}):
            p = find(summary["python"], image="vm", method=method, channels=n)
            c = find(summary["codec"], method=method)
            what = f"{method} {n}ch end-to-end / single-thread compress"
            judged = threshold is not None and n == CODEC_CHANNELS
            why = failed(p, c) or (None if c and c.get("compress_MBps") else "no codec figure")
            if why:
                if judged or not why.startswith("not"):
                    yield cannot("c", what, why)
                continue
            assert p is not None and c is not None
            single = c["compress_MBps"] / 1000
            lib = lib_GBps(p)
            r = lib / single
            detail = (
                f"{lib:.3f} / {single:.3f} GB/s  (with process start and exit: "
                f"{p['nonzero_GBps']:.3f} GB/s, {p['nonzero_GBps'] / single:.2f}x)"
            )
            detail += codec_bound(c, lib, single, meta.get("cpus") or 1)
            if not judged:
                detail += "  [reference, not a target]"
            ok = r >= threshold if judged and threshold is not None else None
            yield comparison("c", what, r, ok, detail)


def codec_bound(c: Row, lib: float, single: float, cores: int) -> str:
    if not c.get("decompress_MBps"):
        return ""
    # both ends on this machine's cores: every byte is compressed and decompressed on them, so
    # even with no other work the pair moves at most this fast
    bound = cores / (1 / c["compress_MBps"] + 1 / c["decompress_MBps"]) / 1000
    return (
        f"  [{cores} cores shared by both ends: codec work alone bounds it at "
        f"{bound:.3f} GB/s = {bound / single:.2f}x; reached {lib / bound:.0%} of that]"
    )


def compare_save_with_qemu(summary: dict[str, Any]) -> Iterator[Comparison]:
    """(d) QEMU -> qemu-save no slower than QEMU -> QEMU (medians)"""
    for method in QEMU_METHODS:
        for n in QEMU_CHANNELS:
            s = find(summary["qemu_save"], method=method, channels=n)
            q = find(summary["qemu"], method=method, channels=n)
            what = f"QEMU->qemu-save / QEMU->QEMU time, {method} {n}ch"
            if why := failed(s, q):
                yield cannot("d", what, why)
                continue
            assert s is not None and q is not None
            r = s["total_ms"] / q["total_ms"]
            yield comparison(
                "d",
                what,
                r,
                r <= SAVE_VS_QEMU_MAX,
                f"{s['total_ms']:.0f} ms / {q['total_ms']:.0f} ms (source total-time; qemu-save "
                f"exited {s['save_exit_s']:.3f} s after migrate)",
            )


def compare_rss(summary: dict[str, Any], meta: dict[str, Any]) -> Iterator[Comparison]:
    """(e) peak RSS of each end <= image + 64 MiB"""
    for p in summary["python"]:
        if not p.get("reps_ok"):
            continue
        limit = p["image_bytes"] + RSS_SLACK
        worst = max(p["send_rss"], p["recv_rss"])
        yield comparison(
            "e",
            f"peak RSS {p['image']} {p['method']} {p['channels']}ch / (image + "
            f"{RSS_SLACK // MiB} MiB)",
            worst / limit,
            worst <= limit,
            f"send {p['send_rss'] / MiB:.0f} MiB, recv {p['recv_rss'] / MiB:.0f} MiB, "
            f"limit {limit / MiB:.0f} MiB",
        )
    for s in summary["qemu_save"]:
        if s.get("save_rss"):
            limit = meta["image_size"] + RSS_SLACK
            yield comparison(
                "e",
                f"peak RSS qemu-save {s['method']} {s['channels']}ch / (guest RAM + "
                f"{RSS_SLACK // MiB} MiB)",
                s["save_rss"] / limit,
                s["save_rss"] <= limit,
                f"{s['save_rss'] / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB (informative: the "
                "guest has a few small RAM blocks besides pc.ram)",
            )


def compare_scaling(summary: dict[str, Any], meta: dict[str, Any]) -> Iterator[Comparison]:
    """(f) each step of the channel ladder no slower than the one before (medians of lib s)"""
    methods = meta.get("methods") or sorted({r["method"] for r in summary["python"]})
    for method in methods:
        for few, many in itertools.pairwise(SCALING_CHANNELS):
            a = find(summary["python"], image="vm", method=method, channels=few)
            b = find(summary["python"], image="vm", method=method, channels=many)
            what = f"{method} {many}ch / {few}ch migration time"
            if why := failed(a, b):
                yield cannot("f", what, why)
                continue
            assert a is not None and b is not None
            r = b["send_lib_s"] / a["send_lib_s"]
            yield comparison(
                "f",
                what,
                r,
                r <= 1 + SCALING_TOLERANCE,
                f"lib s {b['send_lib_s']:.3f} / {a['send_lib_s']:.3f} (medians; wall "
                f"{b['wall_s']:.3f} / {a['wall_s']:.3f} s = {b['wall_s'] / a['wall_s']:.2f}x)",
            )


def compare_launch(summary: dict[str, Any]) -> Iterator[Comparison]:
    """(g) a fresh process's wall time: median against the limit, best in the detail"""
    for what, limit in LAUNCH_MAX_S.items():
        r = find(summary["launch"], what=what)
        title = f"{what} start-up / {limit:g} s"
        if why := failed(r):
            yield cannot("g", title, why)
            continue
        assert r is not None
        med = r["wall_s"]
        detail = f"`{r['command']}`: median {med:.3f} s, best {best(r, 'wall_s'):.3f} s of "
        detail += f"{r['reps_ok']} processes, {r['cpu_s']:.3f} CPU-s"
        bare = find(summary["launch"], what="python")
        if bare and bare.get("reps_ok"):
            detail += f" (a bare interpreter: {bare['wall_s']:.3f} s)"
        yield comparison("g", title, med / limit, med <= limit, detail)


def compare_demo(summary: dict[str, Any]) -> Iterator[Comparison]:
    """(h) the demo's own page data throughput / send -> recv's on the same image and settings
    (medians; each side's figure from its --json: page bytes / its migration time)"""
    configs = sorted({(r["size"], r["method"], r["channels"]) for r in summary["demo"]})
    for size, method, n in configs:
        d = find(summary["demo"], size=size, method=method, channels=n, side="demo")
        s = find(summary["demo"], size=size, method=method, channels=n, side="send")
        what = f"demo / send->recv throughput, {size // MiB} MiB {method} {n}ch"
        if why := failed(d, s):
            yield cannot("h", what, why)
            continue
        assert d is not None and s is not None
        r = d["throughput_Bps"] / s["throughput_Bps"]
        yield comparison(
            "h",
            what,
            r,
            r >= DEMO_VS_SEND,
            f"{d['throughput_Bps'] / MiB:.0f} / {s['throughput_Bps'] / MiB:.0f} MiB/s of page "
            f"data (demo: {d['rounds']} rounds, {d['seconds']:.3f} s, process "
            f"{d['wall_s']:.3f} s wall; send: {s['send_lib_s']:.3f} s, pair {s['wall_s']:.3f} s)",
        )
