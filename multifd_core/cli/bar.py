"""The progress bar of ``demo``, ``send`` and ``recv``: one end's ``progress()`` drawn on stderr.

Drawn with rich, imported only when a bar is shown (``multifd --help``, a piped run and
``--no-progress`` never load it), redrawn every REFRESH seconds by a task of the command's trio
run. A bar is shown when stderr is a terminal, or when ``--progress`` forces it (then it is drawn
as on a terminal, whatever stderr is). While it shows, the warnings written to stderr print
above it (rich's redirection of ``sys.stderr``); the command's results go to stdout after it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..stats import Progress
from .output import human, shown

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

#: Seconds between two redraws.
REFRESH = 0.2


class HasProgress(Protocol):
    """A ``Source`` or a ``Destination``."""

    def progress(self) -> Progress: ...


def describe(p: Progress) -> dict[str, Any]:
    """The bar's text fields for ``p``: the round, the bytes done of those planned (the
    source's round) or of the RAM (the destination, which knows no round's plan), the rate of
    page data."""
    if p.round_bytes is not None:
        amount = f"{human(p.round_bytes_done)} of {human(p.round_bytes)}"
    else:
        amount = f"{human(p.bytes)} of {human(p.total_bytes)}"
    return {
        "round": f"round {p.round}" if p.round else "setting up",
        "amount": amount,
        "rate": f"{human(p.throughput)}/s",
    }


class ProgressBar:
    """A one-line bar for one end of a migration, while ``running`` runs."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = shown(label)
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    @asynccontextmanager
    async def running(self, end: HasProgress) -> AsyncIterator[None]:
        """Draw ``end``'s progress while the body runs; its last state when it ends, however."""
        if not self.enabled:
            yield
            return
        self._start(end)
        try:
            async with trio.open_nursery() as redraws:
                redraws.start_soon(self._loop, end)
                yield
                redraws.cancel_scope.cancel()
        finally:
            self.draw(end.progress())
            self._stop()

    def _start(self, end: HasProgress) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        def text(template: str) -> TextColumn:
            return TextColumn(template, markup=False)

        self._bar = RichProgress(
            text(self.label),
            BarColumn(),
            text("{task.percentage:5.1f}%"),
            text("{task.fields[round]}"),
            text("{task.fields[amount]}"),
            text("{task.fields[rate]}"),
            console=Console(file=sys.stderr, force_terminal=True),
            auto_refresh=False,  # no thread: the run's own task redraws
            redirect_stdout=False,
        )
        first = end.progress()
        self._task = self._bar.add_task(self.label, total=1.0, **describe(first))
        self._bar.start()

    def draw(self, p: Progress) -> None:
        """Redraw the bar for ``p``."""
        if self._bar is None or self._task is None:
            return
        self._bar.update(self._task, completed=p.fraction, **describe(p))
        self._bar.refresh()

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    async def _loop(self, end: HasProgress) -> None:
        while True:
            self.draw(end.progress())
            await trio.sleep(REFRESH)


__all__ = ["REFRESH", "HasProgress", "ProgressBar", "describe"]
