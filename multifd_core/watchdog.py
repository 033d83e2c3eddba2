"""Stall detection: the idle timeout of a migration's channels.

Every ``ChannelIO`` records when bytes last moved (``activity``) and what it waits for
(``waiting``). A channel in the middle of a message or a send (``MID``) owes progress: no byte
for ``timeout`` seconds is a stall of that channel. A channel waiting for the next message
(``BOUNDARY``) may wait while other channels carry the round (QEMU's main channel is silent
while pages flow on the multifd channels), so it stalls only when the whole migration has moved
no byte on any channel for ``timeout`` seconds.

A peer that pauses longer than the idle timeout between rounds therefore counts as stalled:
embedders who pause on purpose pass ``idle_timeout=None``.

A peer can also keep every channel just busy enough (a byte a second): ``deadline_watch`` is the
overall bound that catches it (the ``deadline`` option of both ends).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .errors import ChannelStalled, MigrationTimeout
from .transport import IDLE, MID, ChannelIO


def _name(io: ChannelIO) -> str:
    return "main channel" if io.channel is None else f"channel {io.channel}"


def find_stall(ios: Sequence[ChannelIO], timeout: float, now: float) -> ChannelStalled | None:
    """The stall among ``ios`` at time ``now``, or None (pure: the watchdog's decision)."""
    waiting = [io for io in ios if io.waiting != IDLE]
    if not waiting:
        return None
    for io in waiting:
        if io.waiting == MID and now - io.activity > timeout:
            return ChannelStalled(
                f"stalled: no bytes moved for {now - io.activity:.1f} s in the middle of a "
                f"message (idle timeout {timeout:g} s)",
                channel=io.channel,
            )
    last = max(io.activity for io in ios)
    if now - last > timeout:
        oldest = min(waiting, key=lambda io: io.activity)
        names = ", ".join(_name(io) for io in waiting)
        return ChannelStalled(
            f"stalled: no bytes on any channel for {now - last:.1f} s while waiting on "
            f"{names} (idle timeout {timeout:g} s)",
            channel=oldest.channel,
        )
    return None


async def watchdog(ios: Sequence[ChannelIO], timeout: float) -> None:
    """Raise ChannelStalled when ``find_stall`` finds one; checks a few times per timeout.

    ``ios`` is read afresh at each check (channels may be added while it runs).
    """
    period = min(timeout / 4, 1.0)
    while True:
        await trio.sleep(period)
        stall = find_stall(ios, timeout, trio.current_time())
        if stall is not None:
            raise stall


async def deadline_watch(seconds: float, end: str) -> None:
    """Raise MigrationTimeout once ``seconds`` have passed: the overall bound of a migration
    (its ``deadline`` option), which no steady trickle of bytes resets. The caller cancels it
    when the migration completes."""
    await trio.sleep(seconds)
    raise MigrationTimeout(
        f"the {end} did not complete the migration within its deadline of {seconds:g} s"
    )


__all__ = ["deadline_watch", "find_stall", "watchdog"]
