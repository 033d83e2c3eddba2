"""``multifd demo``'s destination, in a process of its own (demo.py starts it).

``python -P -m multifd_core.cli.demodst CONFIG``: CONFIG is the demo's parsed command line as a
JSON object, so this end is made from the same options by the same function as before
(``ends.destination_options``). It listens on loopback port 0 and talks to the demo on stdout,
one JSON object a line:

- ``{"port": N}`` once it listens;
- at the end, ``{"stats": ..., "digests": {block: hex}, "digest-seconds": s}``: its stats
  (``MigrationStats.as_dict``) and the XXH3-128 of each block as it landed here
  (``integrity.digest_blocks``), which the demo compares with its own blocks'; or
  ``{"error": "Class: message"}``, exit status 1.

Its warnings go to stderr as the demo's own (``multifd demo: warning: ...``); plugin problems are
not repeated (the demo, which loads the same plugins, reports them). It ends when its stdin
closes (the demo went away, however it ended) and exits 130 without a word on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from .. import open_destination
from ..boundary import library_errors
from ..integrity import digest_blocks
from ..malloc import tune_process
from .ends import acceptor, destination_options
from .output import logged_to_stderr

#: The longest line the demo reads from this process (stdout or stderr): it stops reading there.
MAX_MESSAGE = 1 << 20


def say(message: dict[str, Any]) -> None:
    """One message to the demo: a JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _until_stdin_closes() -> None:
    """Return once stdin is closed: the demo has ended (exited, killed, or done with us)."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some(4096):
            pass


async def serve(args: argparse.Namespace) -> dict[str, Any] | None:
    """Receive one migration on loopback; the final report, or None if the demo went away."""
    options = destination_options(args)
    report: dict[str, Any] | None = None
    accept = await acceptor(("tcp", ("127.0.0.1", 0)))
    async with accept, trio.open_nursery() as nursery:

        async def watch() -> None:
            await _until_stdin_closes()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        say({"port": accept.port})
        async with open_destination(accept, options) as dst:
            await dst.wait()
        t0 = time.monotonic()
        digests = await digest_blocks(dst.blocks.values(), trio.CapacityLimiter(1))
        seconds = time.monotonic() - t0
        report = {"stats": dst.stats.as_dict(), "digests": digests, "digest-seconds": seconds}
        nursery.cancel_scope.cancel()
    return report


def _no_plugin_warnings(record: logging.LogRecord) -> bool:
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("multifd_core.registry").addFilter(_no_plugin_warnings)
    try:
        if len(argv) != 1:
            raise ValueError("usage: python -m multifd_core.cli.demodst CONFIG (JSON)")
        args = argparse.Namespace(**json.loads(argv[0]))
        tune_process()  # OPENBLAS_NUM_THREADS: set by the demo before numpy loaded here
        with logged_to_stderr("demo"), library_errors():
            report = trio.run(serve, args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # anything at all: one line for the demo to report
        say({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    if report is None:
        return 1  # the demo went away: nobody to report to
    say(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
