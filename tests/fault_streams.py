"""Streams that inject faults, shared by the fault tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


class PassThroughStream(trio.abc.HalfCloseableStream):
    """Hands every call to ``inner``; a fault stream overrides the one it breaks."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:  # type: ignore[override]
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes=None):  # type: ignore[override]
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Recorder(PassThroughStream):
    """Passes everything on and keeps every byte sent on the connection in a new bytearray
    appended to ``into``."""

    def __init__(self, inner: Any, into: list[bytearray]) -> None:
        super().__init__(inner)
        self.data = bytearray()
        into.append(self.data)

    async def send_all(self, data: Any) -> None:
        self.data += data
        await self.inner.send_all(data)


class DyingStream(PassThroughStream):
    """Closes the connection (both ways) once ``limit`` bytes have been sent on it."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, limit: int) -> None:
        super().__init__(inner)
        self.left = limit

    async def send_all(self, data) -> None:  # type: ignore[override]
        data = bytes(data)
        if len(data) >= self.left:
            await self.inner.send_all(data[: self.left])
            await self.inner.aclose()
            raise trio.BrokenResourceError("injected: connection died")
        self.left -= len(data)
        await self.inner.send_all(data)


class SlowStream(PassThroughStream):
    """A stream whose reads are delayed (an uneven, slow channel)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def receive_some(self, max_bytes=None):  # type: ignore[override]
        await trio.sleep(self.delay)
        return await self.inner.receive_some(min(max_bytes or 65536, 65536))


def counting(
    choose: Callable[[int, trio.abc.Stream], trio.abc.Stream],
) -> Callable[[Callable[[], Awaitable[trio.abc.Stream]]], Callable[[], Awaitable[trio.abc.Stream]]]:
    """Wrap a connect or accept callable so that its ``n``-th stream (from 1) is
    ``choose(n, stream)``: a fault stream on one chosen connection."""

    def wrap(
        inner: Callable[[], Awaitable[trio.abc.Stream]],
    ) -> Callable[[], Awaitable[trio.abc.Stream]]:
        made = 0

        async def call() -> trio.abc.Stream:
            nonlocal made
            stream = await inner()
            made += 1
            return choose(made, stream)

        return call

    return wrap


class Tripwire:
    """Counts the bytes sent on the streams it watches and runs an armed action once the count
    reaches a threshold: a cancel at an exact point of a transfer, without a timer."""

    def __init__(self) -> None:
        self.sent = 0
        self._at: int | None = None
        self._action: Callable[[], None] | None = None

    def arm(self, after: int, action: Callable[[], None]) -> None:
        """Run ``action`` once ``after`` more bytes were sent."""
        self._at, self._action = self.sent + after, action

    def count(self, n: int) -> None:
        self.sent += n
        if self._at is not None and self.sent >= self._at and self._action is not None:
            action, self._action = self._action, None
            action()

    def watch(self, stream: trio.abc.HalfCloseableStream) -> TripwireStream:
        return TripwireStream(stream, self)


class TripwireStream(PassThroughStream):
    """A stream whose sent bytes a :class:`Tripwire` counts."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, wire: Tripwire) -> None:
        super().__init__(inner)
        self.wire = wire

    async def send_all(self, data) -> None:  # type: ignore[override]
        await self.inner.send_all(data)
        self.wire.count(memoryview(data).nbytes)
