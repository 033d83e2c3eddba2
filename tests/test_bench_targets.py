"""bench/targets.py judges each benchmark target on a run's summary: here on synthetic summaries,
each target both MET and NOT MET (at its threshold and just past it), a side that failed NOT MET,
a side not measured without a verdict. Also bench/summary.py's medians and best reps, and
bench/report.py's rendering of the verdicts. Nothing is timed: the figures are made up.

The bench's modules are imported from bench/ by their own names (``common``, ``targets``, ...),
then taken out of ``sys.modules`` again so that they shadow nothing (tests/ has a ``procs`` of
its own, which is why bench/run.py, importing bench's ``procs``, is not imported here).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
NAMES = ("common", "targets", "summary", "report")


def _load() -> dict[str, ModuleType]:
    saved = {n: sys.modules.pop(n) for n in NAMES if n in sys.modules}
    sys.path.insert(0, str(BENCH))
    try:
        return {n: importlib.import_module(n) for n in NAMES}
    finally:
        sys.path.remove(str(BENCH))
        for n in NAMES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


_mods = _load()
targets, summary_mod, report_mod = _mods["targets"], _mods["summary"], _mods["report"]
MiB, GiB = 1 << 20, 1 << 30
Row = dict[str, Any]


def ok(**fields: Any) -> Row:
    """A summary row with one successful rep; ``min`` (the best rep) = the medians unless given."""
    row: Row = {"reps_ok": 1, "reps": 1, **fields}
    row.setdefault("min", {k: v for k, v in fields.items() if isinstance(v, int | float)})
    return row


def py(method: str = "none", channels: int = 2, image: str = "vm", **fields: Any) -> Row:
    """A Python -> Python row: 1 GB of page data; lib s = 1 / GBps_lib unless given."""
    gbps = fields.pop("GBps_lib", 1.0)
    lib = fields.pop("lib", 1.0 / gbps)
    base = {
        "image": image,
        "method": method,
        "channels": channels,
        "image_bytes": GiB,
        "nonzero_bytes": 10**9,
        "send_lib_s": lib,
        "wall_s": lib + 1.0,
        "nonzero_GBps_lib": 1.0 / lib,
        "nonzero_GBps": 1.0 / (lib + 1.0),
        "image_GBps": GiB / (lib + 1.0) / 1e9,
        "wire_bytes": 10**9,
        "send_rss": 300 * MiB,
        "recv_rss": 50 * MiB,
        "send_cpu_s": 2.0,
        "recv_cpu_s": 1.0,
        **{f"{end}_{kind}_s": 0.5 for end in ("send", "recv") for kind in ("user", "sys")},
    }
    return ok(**{**base, **fields})


def empty() -> dict[str, Any]:
    return {k: [] for k in summary_mod.KEYS} | {"startup": {"wall_s": None, "cpu_s": None}}


META = {"methods": ["none", "zlib", "zstd", "lz4"], "image_size": GiB, "cpus": 2}


def judged(summary: dict[str, Any], target: str, what: str) -> Row:
    """The one comparison of ``target`` whose ``what`` starts with ``what``."""
    found = [
        c
        for c in targets.comparisons(summary, META)
        if c["target"] == target and c["what"].startswith(what)
    ]
    assert len(found) == 1, (what, [c["what"] for c in targets.comparisons(summary, META)])
    return found[0]


# --- (a) Python -> Python against QEMU -> QEMU: the best rep of each side ------------------------


@pytest.mark.parametrize(("best_lib", "met"), [(0.5, True), (0.51, False)])
def test_a_compares_best_reps(best_lib: float, met: bool) -> None:
    s = empty()
    # the medians say the opposite of the best reps: only the best decide
    s["python"] = [py("zstd", 4, lib=2.0, min={"send_lib_s": best_lib})]
    s["qemu"] = [ok(method="zstd", channels=4, total_ms=400, min={"total_ms": 500})]
    c = judged(s, "a", "Python->Python / QEMU->QEMU time, zstd 4ch")
    assert c["met"] is met
    assert c["ratio"] == pytest.approx(best_lib / 0.5)
    assert "medians 2.000 s / 0.400 s" in c["detail"]


def test_a_covers_every_method_and_channel_count() -> None:
    whats = [c["what"] for c in targets.comparisons(empty(), META) if c["target"] == "a"]
    assert len(whats) == len(targets.QEMU_METHODS) * len(targets.QEMU_CHANNELS)
    assert all(c["met"] is None for c in targets.comparisons(empty(), META) if c["target"] == "a")


def test_a_failed_side_is_not_met() -> None:
    s = empty()
    s["python"] = [py("none", 2)]
    s["qemu"] = [{"method": "none", "channels": 2, "reps_ok": 0, "reps": 5, "errors": ["boom"]}]
    c = judged(s, "a", "Python->Python / QEMU->QEMU time, none 2ch")
    assert c["met"] is False
    assert c["ratio"] is None
    assert "FAILED: boom" in c["detail"]


# --- (b) nocomp against iperf3 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "channels", "gbps", "met"),
    [
        ("vm", 2, 0.6, True),
        ("vm", 2, 0.59, False),
        ("vm", 4, 0.6, True),
        ("vm", 4, 0.59, False),
        ("random", 2, 0.5, True),
        ("random", 2, 0.49, False),
    ],
)
def test_b_nocomp_against_iperf3(image: str, channels: int, gbps: float, met: bool) -> None:
    s = empty()
    s["python"] = [py("none", channels, image=image, GBps_lib=gbps)]
    s["iperf3"] = [ok(streams=channels, GBps=1.0)]
    c = judged(s, "b", f"nocomp {image} {channels}ch")
    assert c["met"] is met
    assert c["ratio"] == pytest.approx(gbps)


def test_b_other_channel_counts_are_reference() -> None:
    s = empty()
    s["python"] = [py("none", 8, GBps_lib=0.1)]
    s["iperf3"] = [ok(streams=8, GBps=1.0)]
    c = judged(s, "b", "nocomp vm 8ch")
    assert c["met"] is None and c["ratio"] == pytest.approx(0.1)


# --- (c) compressed end to end against the codec alone ---------------------------------------


@pytest.mark.parametrize(
    ("method", "gbps", "met"),
    [("zstd", 0.8, True), ("zstd", 0.79, False), ("lz4", 0.5, True), ("lz4", 0.49, False)],
)
def test_c_codec_thresholds(method: str, gbps: float, met: bool) -> None:
    s = empty()
    s["python"] = [py(method, 2, GBps_lib=gbps)]
    s["codec"] = [ok(method=method, compress_MBps=1000.0, decompress_MBps=2000.0)]
    c = judged(s, "c", f"{method} 2ch")
    assert c["met"] is met
    assert "codec work alone bounds it" in c["detail"]


def test_c_zlib_and_other_channel_counts_are_reference() -> None:
    s = empty()
    s["python"] = [py("zlib", 2, GBps_lib=0.01), py("zstd", 4, GBps_lib=0.01)]
    s["codec"] = [ok(method=m, compress_MBps=1000.0) for m in ("zlib", "zstd")]
    assert judged(s, "c", "zlib 2ch")["met"] is None
    assert judged(s, "c", "zstd 4ch")["met"] is None
    assert judged(s, "c", "zstd 2ch")["met"] is None  # not measured: no verdict
    assert judged(s, "c", "zstd 2ch")["detail"] == "not measured in this run"


# --- (d) QEMU -> qemu-save against QEMU -> QEMU (kept as it was) -----------------------------


@pytest.mark.parametrize(("save_ms", "met"), [(1000, True), (1001, False)])
def test_d_save_against_qemu(save_ms: int, met: bool) -> None:
    s = empty()
    s["qemu"] = [ok(method="zlib", channels=2, total_ms=1000)]
    s["qemu_save"] = [ok(method="zlib", channels=2, total_ms=save_ms, save_exit_s=1.5)]
    assert judged(s, "d", "QEMU->qemu-save / QEMU->QEMU time, zlib 2ch")["met"] is met


# --- (e) peak RSS ---------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "met"), [(0, True), (1, False)])
def test_e_rss_within_image_and_slack(extra: int, met: bool) -> None:
    s = empty()
    s["python"] = [py("none", 2, recv_rss=GiB + targets.RSS_SLACK + extra)]
    assert judged(s, "e", "peak RSS vm none 2ch")["met"] is met


# --- (f) more channels never slower ----------------------------------------------------------


@pytest.mark.parametrize(("more", "met"), [(1.05, True), (1.0501, False), (0.5, True)])
def test_f_each_step_of_the_ladder(more: float, met: bool) -> None:
    s = empty()
    s["python"] = [py("lz4", 2, lib=1.0), py("lz4", 4, lib=more)]
    assert judged(s, "f", "lz4 4ch / 2ch")["met"] is met
    assert judged(s, "f", "lz4 8ch / 4ch")["met"] is None  # 8 channels not measured


def test_f_steps_are_adjacent() -> None:
    s = empty()  # 2 -> 4 slower, 4 -> 8 faster: only the first step is NOT MET
    s["python"] = [py("zstd", 2, lib=1.0), py("zstd", 4, lib=2.0), py("zstd", 8, lib=1.9)]
    assert judged(s, "f", "zstd 4ch / 2ch")["met"] is False
    assert judged(s, "f", "zstd 8ch / 4ch")["met"] is True


# --- (g) start-up ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "median", "met"),
    [("help", 0.25, True), ("help", 0.26, False), ("import", 0.15, True), ("import", 0.16, False)],
)
def test_g_launch_median_against_limit(what: str, median: float, met: bool) -> None:
    s = empty()
    # the best process is always within the limit: the median decides
    s["launch"] = [ok(what=what, command="x", wall_s=median, cpu_s=0.1, min={"wall_s": 0.01})]
    c = judged(s, "g", f"{what} start-up")
    assert c["met"] is met
    assert "best 0.010 s" in c["detail"]


# --- (h) the demo against send -> recv -------------------------------------------------------


@pytest.mark.parametrize(("demo", "met"), [(80e6, True), (79e6, False)])
def test_h_demo_against_send(demo: float, met: bool) -> None:
    s = empty()
    common = {"size": 256 * MiB, "method": "none", "channels": 2}
    s["demo"] = [
        ok(**common, side="demo", throughput_Bps=demo, rounds=3, seconds=1.0, wall_s=2.0),
        ok(**common, side="send", throughput_Bps=100e6, send_lib_s=1.0, wall_s=2.0),
    ]
    c = judged(s, "h", "demo / send->recv throughput, 256 MiB none 2ch")
    assert c["met"] is met
    assert c["ratio"] == pytest.approx(demo / 100e6)


def test_h_demo_without_its_send_side_has_no_verdict() -> None:
    s = empty()
    s["demo"] = [ok(size=GiB, method="zstd", channels=2, side="demo", throughput_Bps=1.0)]
    assert judged(s, "h", "demo / send->recv throughput, 1024 MiB zstd 2ch")["met"] is None


# --- every target, the module's shape --------------------------------------------------------


def test_every_target_has_a_title_and_its_sections() -> None:
    assert set(targets.TITLES) == set(targets.NEEDS) == set("abcdefgh")


def test_judging_a_saved_document_gives_the_same_verdicts() -> None:
    s = empty()
    s["python"] = [py("none", 2, GBps_lib=0.7), py("none", 4, lib=1.5)]
    s["iperf3"] = [ok(streams=2, GBps=1.0)]
    again = json.loads(json.dumps(s))
    assert targets.comparisons(again, META) == targets.comparisons(s, META)


# --- summary: medians and the best rep -------------------------------------------------------


def test_aggregate_medians_best_and_failures() -> None:
    rows = [
        {"method": "none", "channels": 2, "rep": 0, "total_ms": 300, "verified": True},
        {"method": "none", "channels": 2, "rep": 1, "total_ms": 100, "verified": True},
        {"method": "none", "channels": 2, "rep": 2, "total_ms": 200, "verified": False},
        {"method": "none", "channels": 2, "rep": 3, "error": "stalled"},
        {"method": "zstd", "channels": 2, "rep": 0, "error": "refused"},
    ]
    none, zstd = summary_mod.aggregate(rows, ("method", "channels"))
    assert (none["reps_ok"], none["reps"], none["errors"]) == (3, 4, ["stalled"])
    assert none["total_ms"] == 200 and none["min"] == {"total_ms": 100}
    assert none["verified"] is False  # one rep differed
    assert zstd["reps_ok"] == 0 and "min" not in zstd
    assert targets.failed(zstd) == "FAILED: refused"


# --- report: the verdicts as printed ---------------------------------------------------------


def test_report_prints_met_not_met_and_not_run() -> None:
    s = empty()
    s["python"] = [py("none", 2, GBps_lib=0.7), py("none", 4, GBps_lib=0.1)]
    s["iperf3"] = [ok(streams=2, GBps=1.0), ok(streams=4, GBps=1.0)]
    meta = {
        **META,
        "date": "today",
        "quick": True,
        "reps": 1,
        "load_before": 0.1,
        "load_after": 0.2,
        "sections": ["python", "iperf3"],
        "images": {},
        "guest_mib": 1024,
    }
    doc = {"meta": meta, "summary": s, "comparisons": targets.comparisons(s, meta), "notes": []}
    text = report_mod.report(doc)
    assert "  MET        0.70x  nocomp vm 2ch / iperf3 -P 2 throughput" in text
    assert "  NOT MET    0.10x  nocomp vm 4ch / iperf3 -P 4 throughput" in text
    assert targets.TITLES["g"] + ": not run (needs section(s) launch)" in text
    assert "CPU seconds per GB of page data" in text
