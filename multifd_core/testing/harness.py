"""The loopback harness: a source and a destination in one trio run, and their outcome.

:func:`run_loopback` is the one way the tests (the project's, the plugins' and the conformance
kit's) run a whole migration in-process::

    from multifd_core.testing import image_blocks, run_loopback

    blocks = image_blocks(4 << 20)
    run = await run_loopback(blocks, transport="tcp", rounds=3, source={"channels": 4},
                             destination={"channels": 4})
    assert run.dst_blocks["pc.ram"].host.tobytes() == bytes(blocks[0].memory)

The destination runs in a task of its own (:func:`run_destination`, recording its stats, blocks
or error in a :class:`DestinationRun`); a test driving a hand-written peer against a real
destination uses :func:`destination_against`. Only the public API is used: ``open_source``,
``open_destination``, ``MemoryNetwork``, the TCP / unix acceptors and connectors; TLS or any other
transport comes in as a :class:`Link` of connect and accept callables.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import (
    Acceptor,
    Connector,
    Destination,
    MemoryNetwork,
    MigrationStats,
    MigrationStatus,
    RAMBlock,
    Source,
    open_destination,
    open_source,
    open_tcp_acceptor,
    open_unix_acceptor,
    tcp_connector,
    unix_connector,
)
from ..errors import MultiFDError

#: Seconds a harness run may take before it fails with ``trio.TooSlowError``: a hang.
TIMEOUT = 60.0


@dataclass
class Link:
    """How the two ends reach each other: ``connect`` for the source, ``accept`` for the
    destination, and ``close`` to refuse further connections (as a receiving process exiting)."""

    connect: Connector
    accept: Acceptor
    close: Callable[[], Awaitable[None]] | None = None
    #: The TCP port or unix socket path listened on (None over memory streams).
    address: int | str | None = None

    async def aclose(self) -> None:
        if self.close is not None:
            await self.close()


def _memory_link() -> Link:
    net = MemoryNetwork()

    async def close() -> None:
        for stream in net.opened:
            await stream.aclose()

    return Link(net.connect, net.accept, close)


@asynccontextmanager
async def open_link(
    transport: str = "memory", *, path: str | os.PathLike[str] | None = None
) -> AsyncIterator[Link]:
    """A :class:`Link` over ``"memory"`` streams, loopback ``"tcp"`` (an ephemeral port) or a
    ``"unix"`` socket at ``path``; the listener is closed when the block ends."""
    if transport == "memory":
        yield _memory_link()
        return
    if transport == "tcp":
        acceptor = await open_tcp_acceptor("127.0.0.1", 0)
        connect = tcp_connector("127.0.0.1", acceptor.port)
        address: int | str = acceptor.port
    elif transport == "unix" and path is not None:
        acceptor = await open_unix_acceptor(path)
        connect, address = unix_connector(path), str(path)
    else:
        raise ValueError(f"unknown transport {transport!r} (unix needs a path)")
    async with acceptor:
        yield Link(connect, acceptor, acceptor.aclose, address)


@dataclass
class DestinationRun:
    """What a destination run by :func:`run_destination` ended with."""

    stats: MigrationStats | None = None  #: its stats, once it completed
    blocks: dict[str, RAMBlock] = field(default_factory=dict)  #: its blocks, once completed
    error: MultiFDError | None = None  #: the library error it ended with
    destination: Destination | None = None  #: the destination, once open
    seconds: float = 0.0  #: how long it ran
    done: trio.Event = field(default_factory=trio.Event)  #: set when it ended, however
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def status(self) -> MigrationStatus | None:
        """Its stats' status ("completed", "cancelled", "failed"...), once it opened."""
        return self.destination.stats.status if self.destination is not None else None

    def cancel(self) -> None:
        """Cancel the destination (as the embedding program giving up on it)."""
        self.cancel_scope.cancel()


async def run_destination(
    accept: Acceptor,
    run: DestinationRun,
    *,
    on_error: Callable[[], Awaitable[None]] | None = None,
    **options: Any,
) -> None:
    """Open a destination on ``accept`` with ``options`` and wait for it; record the outcome in
    ``run`` (a library error is recorded, not raised). ``on_error`` runs after a failure."""
    start = trio.current_time()
    try:
        with run.cancel_scope:
            async with open_destination(accept, **options) as dst:
                run.destination = dst
                run.stats = await dst.wait()
            run.blocks = dst.blocks
    except MultiFDError as exc:
        run.error = exc
        if on_error is not None:
            await on_error()
    finally:
        run.seconds = trio.current_time() - start
        run.done.set()


async def destination_against(
    peer: Callable[[], Awaitable[object]],
    accept: Acceptor,
    *,
    timeout: float = TIMEOUT,
    **options: Any,
) -> DestinationRun:
    """Run a destination on ``accept`` against a hand-written ``peer()`` (a task that connects
    and misbehaves); the peer is cancelled once the destination ended. ``channels`` defaults
    to 2."""
    options.setdefault("channels", 2)
    run = DestinationRun()
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            await run_destination(accept, run, **options)
            nursery.cancel_scope.cancel()
    return run


#: ``between_rounds(round, run)``: called after each of the source's rounds but the last, with
#: the number of rounds sent so far; may be a coroutine function.
RoundHook = Callable[[int, "LoopbackRun"], "Awaitable[None] | None"]


@dataclass
class LoopbackRun:
    """Both ends of a :func:`run_loopback` migration: stats, blocks and errors."""

    link: Link
    dst: DestinationRun = field(default_factory=DestinationRun)
    source: Source | None = None  #: the source, once open
    src_stats: MigrationStats | None = None  #: the source's stats, once it completed
    src_error: MultiFDError | None = None  #: the library error the source ended with
    src_seconds: float = 0.0
    src_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    side_tasks: trio.Nursery | None = None

    def start_soon(self, async_fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """From a hook: run ``async_fn(*args)`` beside the source until the source has ended
        (a progress bar, a writer dirtying pages); then it is cancelled."""
        assert self.side_tasks is not None, "only while the source runs"
        self.side_tasks.start_soon(async_fn, *args)

    @property
    def dst_stats(self) -> MigrationStats | None:
        return self.dst.stats

    @property
    def dst_blocks(self) -> dict[str, RAMBlock]:
        return self.dst.blocks

    @property
    def dst_error(self) -> MultiFDError | None:
        return self.dst.error

    @property
    def src_cancelled(self) -> bool:
        """Whether cancelling the source (:meth:`cancel_source`) ended it."""
        return self.src_scope.cancelled_caught

    def cancel_source(self) -> None:
        """Cancel the source: leaving its block without ``complete()``."""
        self.src_scope.cancel()

    def cancel_destination(self) -> None:
        """Cancel the destination (the source goes on until it notices)."""
        self.dst.cancel()

    def raise_errors(self) -> None:
        """Raise the destination's error, else the source's, if either ended with one."""
        for error in (self.dst.error, self.src_error):
            if error is not None:
                raise error


async def _call(hook: Callable[..., Any] | None, *args: Any) -> None:
    if hook is not None:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result


async def _run_source(
    blocks: Sequence[RAMBlock],
    run: LoopbackRun,
    connect: Connector,
    rounds: int,
    hooks: tuple[RoundHook | None, RoundHook | None],
    options: Mapping[str, Any],
) -> None:
    on_open, between_rounds = hooks
    start = trio.current_time()
    async with trio.open_nursery() as side:
        run.side_tasks = side
        try:
            with run.src_scope:
                async with open_source(blocks, connect, **options) as src:
                    run.source = src
                    await _call(on_open, 0, run)
                    for r in range(1, rounds):
                        await src.send_round()
                        await _call(between_rounds, r, run)
                    run.src_stats = await src.complete()
        except MultiFDError as exc:
            run.src_error = exc
        finally:
            run.src_seconds = trio.current_time() - start
            side.cancel_scope.cancel()


async def run_loopback(
    blocks: Sequence[RAMBlock],
    *,
    transport: str | Link = "memory",
    rounds: int = 1,
    between_rounds: RoundHook | None = None,
    on_open: RoundHook | None = None,
    source: Mapping[str, Any] | None = None,
    destination: Mapping[str, Any] | None = None,
    wrap_connect: Callable[[Connector], Connector] | None = None,
    wrap_accept: Callable[[Acceptor], Acceptor] | None = None,
    close_on_error: bool = False,
    capture_errors: bool = False,
    timeout: float | None = TIMEOUT,
) -> LoopbackRun:
    """Migrate ``blocks`` from a source to a destination, both in this trio run.

    ``transport`` is ``"memory"`` (``MemoryNetwork``), ``"tcp"`` (loopback, an ephemeral port)
    or a :class:`Link` (unix sockets, TLS connectors, hand-made streams); ``wrap_connect`` /
    ``wrap_accept`` wrap the link's callables (fault streams, TLS over TCP). The source sends
    ``rounds`` rounds (``rounds - 1`` ``send_round()`` calls, then ``complete()``), calling
    ``between_rounds(r, run)`` after round ``r`` (dirty pages there) and ``on_open(0, run)``
    once it is open. ``source`` and ``destination`` are the keyword options of
    ``open_source`` / ``open_destination``. With ``close_on_error`` a failed destination closes
    the link (as ``multifd recv`` exiting). Either end may be cancelled from a hook
    (:meth:`LoopbackRun.cancel_source`, :meth:`LoopbackRun.cancel_destination`).

    Returns the :class:`LoopbackRun` holding both ends' stats, the destination's blocks, and
    their errors: with ``capture_errors`` the library errors are returned, typed, in
    ``src_error`` / ``dst_error``; without, the destination's error (else the source's) is
    raised. The whole run is bounded by ``timeout`` seconds (``trio.TooSlowError``; None: no
    bound, for a program rather than a test). A hook may start tasks beside the source with
    :meth:`LoopbackRun.start_soon`.
    """
    async with AsyncExitStack() as stack:
        if isinstance(transport, str):
            link = await stack.enter_async_context(open_link(transport))
        else:
            link = transport
        connect = wrap_connect(link.connect) if wrap_connect else link.connect
        accept = wrap_accept(link.accept) if wrap_accept else link.accept
        run = LoopbackRun(link)
        with trio.fail_after(math.inf if timeout is None else timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: run_destination(
                        accept,
                        run.dst,
                        on_error=link.aclose if close_on_error else None,
                        **(destination or {}),
                    )
                )
                hooks = (on_open, between_rounds)
                await _run_source(blocks, run, connect, rounds, hooks, source or {})
    if not capture_errors:
        run.raise_errors()
    return run
