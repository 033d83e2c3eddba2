"""The ``multifd`` command: demo, send, recv, qemu-save, qemu-restore, plugins.

``parser`` reads the command line, ``dispatch`` runs a command, ``output`` prints what it did,
``ends`` makes each end of a migration from the options (keywords, connectors, TLS); the
commands themselves live in ``demo``, ``files`` (send, recv), ``qemu`` (qemu-save,
qemu-restore) and ``plugins``, each imported only when its command runs.
"""

from __future__ import annotations

from typing import Any

from .dispatch import COMMANDS, command_handler, main
from .output import Progress, human
from .parser import build_parser, parse_address, parse_options, parse_size, parse_timeout

__all__ = [
    "Progress",
    "build_parser",
    "human",
    "main",
    "parse_address",
    "parse_options",
    "parse_size",
    "parse_timeout",
]


def __getattr__(name: str) -> Any:
    """``cmd_demo``, ``cmd_send``, ...: each from its command's module, imported on first use."""
    command = name.removeprefix("cmd_").replace("_", "-")
    if name.startswith("cmd_") and command in COMMANDS:
        return command_handler(command)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
