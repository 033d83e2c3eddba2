"""Errors at the API boundary: a migration's nursery ExceptionGroups become one exception of this
library (``multifd_core.errors``), with its cause kept, and the stats say how the migration ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from .errors import ChannelError, ChannelStalled, MultiFDError, ProtocolError, TLSError
from .stats import MigrationStats


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def _rank(exc: BaseException) -> int:
    if isinstance(exc, ProtocolError):
        return 0  # the root cause: what the peer did wrong
    if isinstance(exc, ChannelStalled | TLSError):
        return 1  # found by this side (watchdog, TLS check): a cause, not a consequence
    if isinstance(exc, ChannelError):
        return 2  # often only a consequence of the other end stopping
    return 1


def pick_error(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one exception a group stands for, or None when it must stay a group."""
    real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    if not real:
        return None
    if all(isinstance(e, MultiFDError) for e in real):
        return min(real, key=_rank)
    if len(real) == 1:
        return real[0]
    return None


@contextmanager
def library_errors(stats: MigrationStats | None = None) -> Iterator[None]:
    """Unwrap the nursery's ExceptionGroups into the library's own exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        picked = pick_error(group)
        if stats is not None:
            if picked is None and all(isinstance(e, trio.Cancelled) for e in _leaves(group)):
                stats.finish("cancelled")
            else:
                stats.finish("failed", picked or group)
        if picked is None:
            raise
        # the one exception stands for the group: its own cause stays (an OSError under a
        # ChannelError, the program's cause under its exception), the group's context goes
        raise picked from picked.__cause__
    except trio.Cancelled:
        if stats is not None:
            stats.finish("cancelled")
        raise
    except BaseException as exc:
        if stats is not None:
            stats.finish("failed", exc)
        raise


__all__ = ["library_errors", "pick_error"]
