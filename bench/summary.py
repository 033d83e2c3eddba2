"""One run's raw figures (every rep) summarized per configuration: medians, and the best rep.

``summarize(runs)`` turns the runs of each section (lists of rows, one per rep; a failed rep has
``error``) into the summary that targets.py judges and report.py prints.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

Row = dict[str, Any]

#: The fields that name a configuration, per section (the others are figures).
KEYS = {
    "launch": ("what",),
    "demo": ("size", "method", "channels", "side"),
    "python": ("image", "method", "channels"),
    "integrity": ("method", "channels", "integrity"),
    "iperf3": ("streams",),
    "qemu": ("method", "channels"),
    "qemu_save": ("method", "channels"),
    "codec": ("method",),
}


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m = statistics.median(vals)
    if all(isinstance(v, int) for v in vals) and float(m).is_integer():
        return int(m)
    return m


def aggregate(rows: list[Row], keys: tuple[str, ...]) -> list[Row]:
    """Median of every numeric field per configuration (``keys``), over the reps that worked;
    ``min``: each numeric field's smallest value over those reps (the best time)."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, group in groups.items():
        ok = [r for r in group if "error" not in r]
        agg: Row = dict(zip(keys, key, strict=True))
        agg["reps_ok"] = len(ok)
        agg["reps"] = len(group)
        if len(ok) < len(group):
            agg["errors"] = [r["error"] for r in group if "error" in r]
        fields = {f for r in ok for f in r if f not in keys and f != "rep"}
        lows: dict[str, Any] = {}
        for f in sorted(fields):
            vals = [r.get(f) for r in ok]
            if all(isinstance(v, bool) or v is None for v in vals):
                agg[f] = None if all(v is None for v in vals) else all(v is not False for v in vals)
            elif all(isinstance(v, int | float) or v is None for v in vals):
                agg[f] = median(vals)
                lows[f] = min((v for v in vals if v is not None), default=None)
            else:
                agg[f] = vals[0]
        if ok:
            agg["min"] = lows
        out.append(agg)
    return out


def summarize(runs: dict[str, list[Row]]) -> dict[str, Any]:
    """The summary of a run's raw rows (``runs``: section -> rows, plus ``startup``)."""
    summary: dict[str, Any] = {
        section: aggregate(runs.get(section, []), keys) for section, keys in KEYS.items()
    }
    startup = runs.get("startup", [])
    summary["startup"] = {f: median(r[f] for r in startup) for f in ("wall_s", "cpu_s", "rss")}
    return summary
