"""Run one ``multifd`` command: parse, check, run its handler, report the result or the error.

``multifd --help`` (and every command, before it runs) pays only for argparse and the options:
trio, numpy, ssl, the plugins are imported by the commands that use them, when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from ..errors import ConfigError, MultiFDError
from .output import failed, logged_to_stderr, print_json
from .parser import build_parser

#: Each command's module in this package; its handler is ``cmd_<command>`` (``-`` as ``_``),
#: imported only when the command runs (``multifd --help`` loads none of them).
COMMANDS = {
    "demo": "demo",
    "send": "files",
    "recv": "files",
    "qemu-save": "qemu",
    "qemu-restore": "qemu",
    "plugins": "plugins",
    "new-plugin": "newplugin",
}

#: These commands' handlers return their result; the others are async (run by trio).
SYNC_COMMANDS = frozenset({"plugins", "new-plugin"})

Handler = Callable[[argparse.Namespace], Any]


def _handler(command: str) -> Handler:
    """The command's ``cmd_*`` function, its module imported now."""
    module = importlib.import_module(f"{__package__}.{COMMANDS[command]}")
    handler: Handler = getattr(module, "cmd_" + command.replace("-", "_"))
    return handler


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command in SYNC_COMMANDS:
        return cast(dict[str, Any], _handler(args.command)(args))
    if args.channels < 1:
        raise ConfigError("--channels must be at least 1")
    if getattr(args, "rounds", 1) < 1:
        raise ConfigError("--rounds must be at least 1")
    from ..malloc import tune_process

    tune_process()  # before numpy's first import (its OpenBLAS threads)
    handler = _handler(args.command)
    import trio  # the async commands' own imports: not for --help, plugins, new-plugin

    from ..boundary import library_errors

    with library_errors():  # demo runs both ends in one nursery: unwrap its group
        return cast(dict[str, Any], trio.run(handler, args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "progress", None) is None and hasattr(args, "progress"):
        args.progress = sys.stderr.isatty()
    try:
        with logged_to_stderr(args.command):
            out = _run(args)
    except (MultiFDError, OSError, KeyboardInterrupt) as exc:
        return failed(args.command, exc)
    if args.json:
        print_json(out)
    return 0
