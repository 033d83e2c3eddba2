"""``multifd plugins``: the compression methods installed, and what went wrong loading any.

On a terminal the methods are a table (rich); piped, one line each, for scripts. With
``--check`` the command fails (exit status 1) when there is any problem, after listing them
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


def _table(methods: list[dict[str, Any]]) -> None:
    """The methods as a table on a terminal (rich: imported only for it)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("value", "flags", "name", "aliases", "distribution", "plugin")
    for m in methods:
        cells = (m["value"], f"{m['flags']:#04x}", m["name"], ", ".join(m["aliases"]))
        table.add_row(*map(str, cells), shown(m["distribution"]), shown(m["plugin"]))
    Console(highlight=False, markup=False).print(table)


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
        if sys.stdout.isatty():
            _table(methods)
        else:  # for scripts: one line a method
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
