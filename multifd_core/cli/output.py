"""What the commands print: the human summary, ``--json``, errors (the progress bar: ``bar``).

Text from the peer (block and file names, the machine type, error messages quoting its bytes)
reaches the terminal only through :func:`shown`: one error is one line, and a peer cannot move
the cursor, retitle the window or reorder the line with escape sequences or bidi controls.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import MultiFDError

if TYPE_CHECKING:
    from ..stats import MigrationStats


def shown(text: object) -> str:
    """``text`` as it may reach a terminal: every character that is not printable (C0 and C1
    controls, DEL, newlines, bidi and other format characters, lone surrogates of undecodable
    bytes, unassigned code points) escaped as ``repr`` would (``\\x1b``, ``\\n``, ``\\u202e``),
    printable Unicode kept as is. Backslashes are kept too, so a ``repr`` passes unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary(title: str, stats: MigrationStats, extra: dict[str, Any] | None = None) -> str:
    lines = [
        f"{title}: {stats.status}",
        f"  blocks total      {human(stats.total_bytes)}",
        f"  pages             {stats.normal_pages} normal, {stats.zero_pages} zero"
        + (f", {stats.inline_pages} inline" if stats.inline_pages else ""),
        f"  packets           {stats.packets} on {stats.channels} channel(s), "
        f"{stats.rounds} sync rounds",
        f"  wire bytes        {human(stats.wire_bytes)} (main {human(stats.main_bytes)}, "
        f"multifd {human(stats.multifd_bytes)})",
        f"  compression       {stats.method}, ratio {stats.compression_ratio:.2f}",
        f"  time              {stats.seconds:.3f} s",
        f"  throughput        {human(stats.throughput)}/s of page data",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"  {key:<17} {value}")
    return "\n".join(shown(line) for line in lines)  # names, files, machine: the peer's


def print_json(out: dict[str, Any]) -> None:
    """``--json``: the command's result as one JSON object on stdout (one line: json.dumps
    escapes every control character, and everything outside ASCII)."""
    print(json.dumps(out))


def failed(command: str, exc: BaseException) -> int:
    """Report a failed command on one line of stderr; return its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"multifd {command}: interrupted", file=sys.stderr)
        return 130
    detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, MultiFDError) else str(exc)
    print(f"multifd {command}: error: {shown(detail)}", file=sys.stderr)
    return 1


class _StderrLines(logging.Handler):
    """The library's warnings as ``multifd COMMAND: warning: ...``, one line each."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = shown(record.getMessage())
            sys.stderr.write(f"multifd {self.command}: {record.levelname.lower()}: {line}\n")
            sys.stderr.flush()
        except Exception:  # logging's rule: a failed report never fails the program
            self.handleError(record)


@contextmanager
def logged_to_stderr(command: str) -> Iterator[None]:
    """While the command runs, the library's warnings go to stderr escaped, one line each
    (instead of logging's last-resort handler, which prints them raw)."""
    logger = logging.getLogger("multifd_core")
    handler = _StderrLines(command)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
