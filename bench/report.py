"""The benchmark's printed report: one table per section, then every target line (targets.py).

Everything here reads the JSON document run.py builds (``meta``, ``summary``, ``comparisons``,
``notes``): nothing is measured or judged here.
"""

from __future__ import annotations

from typing import Any

from common import LOAD_GUEST_ADDR, MiB
from targets import NEEDS, TITLES, find

INTEGRITY_MODES = ("off", "on", "on+verify")
Row = dict[str, Any]


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


def reps(r: Row) -> str:
    return f"{r['reps_ok']}/{r['reps']}"


def report(doc: dict[str, Any]) -> str:
    meta, summary = doc["meta"], doc["summary"]
    out = _head(meta)
    if summary.get("launch"):
        out += _launch(summary)
    if summary["python"]:
        out += _python(summary)
        out += _cpu_per_gb(summary)
    if summary.get("integrity"):
        out += _integrity(summary)
    if summary.get("demo"):
        out += _demo(summary)
    if summary["iperf3"]:
        out += _iperf(summary)
    if summary["qemu"] or summary["qemu_save"]:
        out += _qemu(meta, summary)
    if summary["codec"]:
        out += _codec(summary)
    out += _comparisons(doc)
    if doc["notes"]:
        out += ["", "Notes"] + [f"  - {n}" for n in doc["notes"]]
    return "\n".join(out)


def _head(meta: dict[str, Any]) -> list[str]:
    img = meta["images"].get("vm", {})
    out = [
        f"multifd benchmark  {meta['date']}  {'--quick' if meta['quick'] else 'full'}, "
        f"{meta['reps']} rep(s) ({meta.get('best_reps', meta['reps'])} for the configurations "
        f"compared with QEMU), medians  (load {meta['load_before']} -> {meta['load_after']}, "
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


def _launch(summary: dict[str, Any]) -> list[str]:
    rows = []
    for r in summary["launch"]:
        if not r["reps_ok"]:
            rows.append([r["what"], r.get("command", ""), "FAILED", "", "", reps(r)])
            continue
        best = r.get("min", {})
        rows.append(
            [
                r["what"],
                r["command"],
                fmt(r["wall_s"]),
                fmt(best.get("wall_s")),
                fmt(r["cpu_s"]),
                reps(r),
            ]
        )
    return [
        "",
        "Launch: fresh processes, wall from spawn to exit",
        table(["what", "command", "median s", "best s", "cpu s", "n"], rows),
    ]


def _python(summary: dict[str, Any]) -> list[str]:
    out = [
        "",
        "Python -> Python, loopback TCP, two processes (wall = send start -> both exited)",
    ]
    rows = []
    for r in summary["python"]:
        if not r["reps_ok"]:
            rows.append([r["image"], r["method"], str(r["channels"]), "FAILED"] + [""] * 11)
            continue
        rows.append(
            [
                r["image"],
                r["method"],
                str(r["channels"]),
                fmt(r["wall_s"]),
                fmt(r["send_lib_s"]),
                fmt(r.get("min", {}).get("send_lib_s")),
                fmt(r["nonzero_GBps"], ".2f"),
                fmt(r["image_GBps"], ".2f"),
                fmt(r["wire_bytes"] / MiB, ".1f"),
                fmt(r["send_cpu_s"], ".2f"),
                fmt(r["recv_cpu_s"], ".2f"),
                fmt(r["send_rss"] / MiB, ".0f"),
                fmt(r["recv_rss"] / MiB, ".0f"),
                fmt(r.get("verified")),
                reps(r),
            ]
        )
    headers = ["image", "method", "ch", "wall s", "lib s", "best lib", "nz GB/s", "img GB/s"]
    headers += ["wire MiB", "cpu snd", "cpu rcv", "rss snd", "rss rcv", "same", "reps"]
    out.append(table(headers, rows))
    st = summary["startup"]
    if st["wall_s"] is not None:
        out.append(
            f"(a multifd process's fixed cost, `multifd plugins --json`: {st['wall_s']:.3f} s "
            f"wall, {st['cpu_s']:.2f} CPU-s, {st['rss'] / MiB:.0f} MiB; wall includes one "
            "such start for send; lib s = the sender's own migration time from its JSON)"
        )
    return out


def _cpu_per_gb(summary: dict[str, Any]) -> list[str]:
    """CPU seconds per GB (1e9 B) of page data for each end, user and system apart, with and
    without one process start (the startup figure's CPU)."""
    start = summary["startup"].get("cpu_s") or 0.0
    rows = []
    for r in summary["python"]:
        gb = (r.get("nonzero_bytes") or 0) / 1e9
        if not r["reps_ok"] or not gb:
            continue  # an all-zero image has no page data to divide by
        per = [r[k] / gb for k in ("send_user_s", "send_sys_s", "recv_user_s", "recv_sys_s")]
        net = [max(0.0, r[k] - start) / gb for k in ("send_cpu_s", "recv_cpu_s")]
        rows.append(
            [r["image"], r["method"], str(r["channels"]), fmt(gb, ".3f")]
            + [fmt(v, ".2f") for v in (per[0], per[1], per[2], per[3], *net)]
            + [fmt((r["send_cpu_s"] + r["recv_cpu_s"]) / gb, ".2f")]
        )
    if not rows:
        return []
    headers = ["image", "method", "ch", "page GB", "snd usr", "snd sys", "rcv usr", "rcv sys"]
    headers += ["snd net", "rcv net", "both"]
    return [
        "",
        "CPU seconds per GB of page data (wait4 rusage of each process; usr/sys/both include "
        f"the process's start; net = user+sys minus one start, {start:.2f} CPU-s)",
        table(headers, rows),
    ]


def _integrity(summary: dict[str, Any]) -> list[str]:
    """Packet checksums (on by default) and --verify against the same migration without them,
    as ratios of this run's medians."""
    out = [
        "",
        "Integrity: the vm image, 2 channels, checksums off / on / on + --verify (ratio to off)",
    ]
    rows = []
    for method in dict.fromkeys(r["method"] for r in summary["integrity"]):
        off = find(summary["integrity"], method=method, integrity="off")
        for mode in INTEGRITY_MODES:
            r = find(summary["integrity"], method=method, integrity=mode)
            if r is None:
                continue
            if not r["reps_ok"] or off is None or not off["reps_ok"]:
                rows.append([method, mode, "FAILED", *[""] * 6])
                continue

            def ratio(key: str, r: Row = r, off: Row = off) -> str:
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
                    reps(r),
                ]
            )
    headers = ["method", "mode", "wall s", "x off", "lib s", "x off", "cpu s", "x off", "reps"]
    out.append(table(headers, rows))
    return out


def _demo(summary: dict[str, Any]) -> list[str]:
    rows = []
    for r in summary["demo"]:
        head = [r["side"], f"{r['size'] // MiB}", r["method"], str(r["channels"])]
        if not r["reps_ok"]:
            rows.append([*head, "FAILED", *[""] * 6, reps(r)])
            continue
        demo = r["side"] == "demo"
        rows.append(
            [
                *head,
                fmt(r["seconds"] if demo else r["send_lib_s"]),
                fmt(r["throughput_Bps"] / MiB, ".0f"),
                fmt(r["wall_s"]),
                fmt(r["rounds"] if demo else 1, "d"),
                fmt(r["cpu_s"] if demo else r["send_cpu_s"] + r["recv_cpu_s"], ".2f"),
                fmt((r["rss"] if demo else max(r["send_rss"], r["recv_rss"])) / MiB, ".0f"),
                fmt(r.get("verified")),
                reps(r),
            ]
        )
    headers = ["side", "MiB", "method", "ch", "lib s", "MiB/s", "wall s", "rounds", "cpu s"]
    headers += ["rss", "same", "reps"]
    return [
        "",
        "Demo: `multifd demo --json` against send -> recv of the demo's kind of image (lib s and "
        "MiB/s of page data from each --json; send's rss: the larger end)",
        table(headers, rows),
    ]


def _iperf(summary: dict[str, Any]) -> list[str]:
    rows = []
    for r in summary["iperf3"]:
        gb = (r.get("bytes") or 0) / 1e9
        rows.append(
            [
                str(r["streams"]),
                fmt(r.get("GBps"), ".2f"),
                fmt(r["client_cpu_s"] / gb if gb and r.get("reps_ok") else None, ".2f"),
                fmt(r["server_cpu_s"] / gb if gb and r.get("reps_ok") else None, ".2f"),
                reps(r),
            ]
        )
    headers = ["streams", "GB/s", "cli CPU-s/GB", "srv CPU-s/GB", "reps"]
    return ["", "iperf3, loopback, -n image size", table(headers, rows)]


def _qemu(meta: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"QEMU 7.2 source (guest -m {meta['guest_mib']}M, pattern at {LOAD_GUEST_ADDR:#x});"
        " time = source total-time",
    ]
    rows = []
    for pair, key in (("QEMU->QEMU", "qemu"), ("QEMU->qemu-save", "qemu_save")):
        for r in summary[key]:
            rows.append(_qemu_row(pair, key == "qemu_save", r))
    headers = ["pair", "method", "ch", "total ms", "best ms", "wire MiB", "save exit s"]
    headers += ["cpu save", "rss save", "same", "reps"]
    out.append(table(headers, rows))
    return out


def _qemu_row(pair: str, save: bool, r: Row) -> list[str]:
    if not r["reps_ok"]:
        return [pair, r["method"], str(r["channels"]), "FAILED", *[""] * 6, reps(r)]
    return [
        pair,
        r["method"],
        str(r["channels"]),
        fmt(r.get("total_ms"), ".0f"),
        fmt(r.get("min", {}).get("total_ms"), ".0f"),
        fmt((r.get("transferred") or 0) / MiB, ".1f"),
        fmt(r.get("save_exit_s")) if save else "-",
        fmt(r.get("save_cpu_s"), ".2f") if save else "-",
        fmt((r.get("save_rss") or 0) / MiB, ".0f") if save else "-",
        fmt(r.get("verified")) if save else "-",
        reps(r),
    ]


def _codec(summary: dict[str, Any]) -> list[str]:
    def per_gb(mbps: float | None) -> str:
        return fmt(1000 / mbps if mbps else None, ".2f")

    rows = [
        [
            r["method"],
            fmt(r.get("compress_MBps"), ".0f"),
            fmt(r.get("decompress_MBps"), ".0f"),
            per_gb(r.get("compress_MBps")),
            per_gb(r.get("decompress_MBps")),
            fmt(r.get("ratio"), ".2f"),
            fmt(r.get("roundtrip_ok")),
        ]
        for r in summary["codec"]
    ]
    headers = ["method", "compress MB/s", "decompress MB/s", "comp CPU-s/GB", "decomp CPU-s/GB"]
    return [
        "",
        "Codecs, one thread, packets of 128 pages, the pattern's non-zero pages",
        table([*headers, "ratio", "same"], rows),
    ]


def _comparisons(doc: dict[str, Any]) -> list[str]:
    out = ["", "Targets (ratios from this run): MET / NOT MET; '-' = reference or not measured"]
    for target, title in TITLES.items():
        lines = [c for c in doc["comparisons"] if c["target"] == target]
        missing = [s for s in NEEDS[target] if s not in doc["meta"]["sections"]]
        if missing:
            out.append(f"{title}: not run (needs section(s) {', '.join(NEEDS[target])})")
            lines = [c for c in lines if c["ratio"] is not None]
        elif not lines:
            out.append(f"{title}: nothing measured")
            continue
        else:
            out.append(title)
        for c in lines:
            mark = {True: "MET", False: "NOT MET", None: "-"}[c["met"]]
            ratio = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "n/a"
            out.append(f"  {mark:<8} {ratio:>7}  {c['what']}: {c['detail']}")
    return out
