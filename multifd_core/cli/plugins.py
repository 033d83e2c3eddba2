"""``multifd plugins``: the compression methods installed, and what went wrong loading any."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import load_methods


def cmd_plugins(args: argparse.Namespace) -> dict[str, Any]:
    registry = load_methods(allow=args.allow_method)
    methods = [
        {
            "value": m.value,
            "flags": m.value << 1,
            "name": m.name,
            "aliases": list(m.cls.aliases),
            "distribution": m.distribution,
            "plugin": m.plugin,
        }
        for m in registry
    ]
    problems = [f"{type(p).__name__}: {p}" for p in registry.problems]
    if not args.json:
        for m in methods:
            print(f"{m['value']}  flags {m['flags']:#04x}  {m['name']:<8} {m['distribution']}")
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
    return {"methods": methods, "problems": problems}
