"""``multifd plugins``: the compression methods installed, and what went wrong loading any.

With ``--check`` the command fails (exit status 1) when there is any problem, after listing them
all: for an install script or CI that must not go on with a broken plugin.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .. import load_methods
from ..errors import PluginError
from .output import print_json, shown


@contextmanager
def _problems_not_logged() -> Iterator[None]:
    """The command lists the problems itself: the registry's warnings would say them twice."""
    logger = logging.getLogger("multifd_core.registry")
    logger.addFilter(_none)
    try:
        yield
    finally:
        logger.removeFilter(_none)


def _none(record: logging.LogRecord) -> bool:
    return False


def cmd_plugins(args: argparse.Namespace) -> dict[str, Any]:
    with _problems_not_logged():
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
    out = {"methods": methods, "problems": problems}
    if not args.json:
        for m in methods:
            print(f"{m['value']}  flags {m['flags']:#04x}  {m['name']:<8} {m['distribution']}")
        for p in problems:
            print(f"problem: {shown(p)}", file=sys.stderr)
    if args.check and problems:
        if args.json:
            print_json(out)  # the result still goes out; then the one-line error, status 1
        raise PluginError(
            f"{len(problems)} plugin problem{'s' * (len(problems) > 1)}"
            + (" (listed in the JSON)" if args.json else " (listed above)")
        )
    return out
