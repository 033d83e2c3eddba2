"""The ``multifd`` command: demo, send, recv, qemu-save, qemu-restore, plugins, new-plugin.

``parser`` reads the command line, ``dispatch`` runs a command, ``output`` prints what it did,
``bar`` draws the progress bar, ``ends`` makes each end of a migration from the options
(keywords, connectors, TLS); the commands themselves live in ``demo``, ``files`` (send,
recv), ``qemu`` (qemu-save, qemu-restore), ``plugins`` and ``newplugin`` (new-plugin), each
imported only when its command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dispatch import main
from .output import human
from .parser import build_parser, parse_address, parse_options, parse_size, parse_timeout

if TYPE_CHECKING:
    from .bar import ProgressBar

__all__ = [
    "ProgressBar",
    "build_parser",
    "human",
    "main",
    "parse_address",
    "parse_options",
    "parse_size",
    "parse_timeout",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """``ProgressBar``, imported on first use: it needs trio, which ``--help`` does not."""
        if name == "ProgressBar":
            from .bar import ProgressBar

            return ProgressBar
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
