"""The long fuzz run of the destination: ``.venv/bin/python fuzz/run.py --cases 100000``.

Cases ``0 .. N-1`` of run ``--seed`` are made and checked by ``tests/fuzzing/`` (each case
from its own RNG, so ``--seed S --index I`` replays one). Prints the count of each outcome
(completed-correct, each typed error class) as it goes and one JSON object at the end; exits 1 on
any invariant violation, after saving each failing input to ``--out`` (replay it with
``--replay FILE``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fuzzing as fh  # noqa: E402

_SEEDS: list[fh.Seed] = []
_CFG = fh.Config()
_TRACE_EVERY = 1


def _init(trace_every: int, cfg: fh.Config) -> None:
    global _SEEDS, _TRACE_EVERY, _CFG
    _SEEDS = fh.all_seeds()
    _TRACE_EVERY = trace_every
    _CFG = cfg


def _work(args: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Run cases [start, start + count) of run ``master``; one summary dict per case."""
    master, start, count = args
    out = []
    for offset, case in enumerate(fh.cases(_SEEDS, master, start, count)):
        index = start + offset
        cfg = fh.Config(**{**_CFG.__dict__, "trace_memory": index % _TRACE_EVERY == 0})
        res = fh.run_case(case, cfg)
        row: dict[str, Any] = {
            "index": index,
            "outcome": res.outcome,
            "seconds": res.seconds,
            "peak": res.peak,
            "traced": cfg.trace_memory,
            "bound": fh.memory_bound(case, cfg),
        }
        if res.violation:
            row.update(detail=res.detail, verdict=res.verdict, mutations=case.mutations)
            path = Path(os.environ["FUZZ_OUT"]) / f"fail-seed{master}-case{index}.rec.xz"
            case.save(path)
            row["saved"] = str(path)
        out.append(row)
    return out


def batches(master: int, total: int, size: int) -> Iterator[tuple[int, int, int]]:
    for start in range(0, total, size):
        yield master, start, min(size, total - start)


def replay(path: Path, cfg: fh.Config) -> int:
    case = fh.Case.load(path)
    res = fh.run_case(case, cfg)
    print(json.dumps({"case": str(path), "mutations": case.mutations, **res.__dict__}, indent=1))
    return 1 if res.violation else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--index", type=int, help="run only this case (with --seed)")
    ap.add_argument("--replay", type=Path, help="run one saved failing input")
    ap.add_argument(
        "--trace-every",
        type=int,
        default=4,
        help="trace memory (tracemalloc, ~4x slower) in one case of this many (default 4)",
    )
    ap.add_argument(
        "--max-reads",
        type=int,
        default=fh.Config.max_reads,
        help="deliver a connection in about this many reads at most (default 400)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "fuzz" / "out")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args()
    # the destination warns of each connection it refuses (junk: thousands in a run), unread
    logging.getLogger("multifd_core.accept").setLevel(logging.ERROR)
    cfg = fh.Config(max_reads=args.max_reads)
    if args.replay:
        return replay(args.replay, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["FUZZ_OUT"] = str(args.out)
    started = time.monotonic()
    _init(args.trace_every, cfg)
    print(
        f"{len(_SEEDS)} seeds: {', '.join(s.name for s in _SEEDS)}; seeds ready in "
        f"{time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    if args.index is not None:
        rows = _work((args.seed, args.index, 1))
        print(json.dumps(rows[0], indent=1))
        return 1 if rows[0]["outcome"].startswith("VIOLATION") else 0

    counts: collections.Counter[str] = collections.Counter()
    violations: list[dict[str, Any]] = []
    peak_ratio = 0.0
    max_peak = 0
    slowest: tuple[float, int] = (0.0, -1)
    traced = 0
    done = 0
    last_print = started
    work = batches(args.seed, args.cases, 50)
    if args.jobs > 1:
        pool = mp.get_context("fork").Pool(args.jobs, _init, (args.trace_every, cfg))
        results = pool.imap_unordered(_work, work)
    else:
        pool = None
        results = map(_work, work)
    try:
        for rows in results:
            for row in rows:
                done += 1
                counts[row["outcome"]] += 1
                slowest = max(slowest, (row["seconds"], row["index"]))
                if row["traced"]:
                    traced += 1
                    max_peak = max(max_peak, row["peak"])
                    peak_ratio = max(peak_ratio, row["peak"] / row["bound"])
                if row["outcome"].startswith("VIOLATION"):
                    violations.append(row)
                    print(
                        f"VIOLATION seed {args.seed} case {row['index']}: {row['outcome']} "
                        f"{row['detail'][-800:]}\n  mutations {row['mutations']}\n  "
                        f"model {row['verdict']}\n  saved {row['saved']}",
                        file=sys.stderr,
                    )
            now = time.monotonic()
            if not args.quiet and now - last_print > 30:
                last_print = now
                print(
                    f"[{now - started:7.0f} s] {done}/{args.cases} {dict(counts.most_common())}",
                    file=sys.stderr,
                )
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = time.monotonic() - started
    width = max(len(k) for k in counts) if counts else 10
    for outcome, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{outcome:<{width}}  {n:>8}")
    summary = {
        "seed": args.seed,
        "cases": done,
        "seconds": round(elapsed, 1),
        "jobs": args.jobs,
        "trace_every": args.trace_every,
        "max_reads": args.max_reads,
        "outcomes": dict(sorted(counts.items())),
        "violations": len(violations),
        "reproducers": [
            {"seed": args.seed, "index": v["index"], "outcome": v["outcome"], "file": v["saved"]}
            for v in violations
        ],
        "memory_traced_cases": traced,
        "max_traced_peak_bytes": max_peak,
        "slowest_case": {"index": slowest[1], "seconds": round(slowest[0], 3)},
        "max_traced_peak_to_bound": round(peak_ratio, 3),
    }
    print(json.dumps(summary))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
