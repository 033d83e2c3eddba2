"""What opens a migration's channels: the two protocols an embedder passes, a leaf module.

A :class:`Connector` (the source's) opens one new connection per call: the main channel
first, then each multifd channel. An :class:`Acceptor` (the destination's) returns the next
incoming connection per call. Both are any callable returning an awaitable of a
``trio.abc.Stream``: an ``async def`` function, a bound method (``MemoryNetwork.accept``), an
object with an async ``__call__`` (``SocketAcceptor``, ``TLSAcceptor``). The library's own:
``tcp_connector``, ``unix_connector``, ``tls_connector``; ``open_tcp_acceptor``,
``open_unix_acceptor``, ``tls_acceptor``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Protocol

import trio

from .errors import ConfigError


class Connector(Protocol):
    """``await connect()``: a new connection to the destination, as a trio stream."""

    def __call__(self) -> Awaitable[trio.abc.Stream]: ...


class Acceptor(Protocol):
    """``await accept()``: the next incoming connection, as a trio stream."""

    def __call__(self) -> Awaitable[trio.abc.Stream]: ...


def check_endpoint(endpoint: object, role: str) -> None:
    """ConfigError unless ``endpoint`` can be called (``role``: "connector", "acceptor")."""
    if not callable(endpoint):
        raise ConfigError(
            f"the {role} must be an async callable returning a trio stream, "
            f"not {type(endpoint).__name__}"
        )


async def open_stream(endpoint: Connector | Acceptor, role: str) -> trio.abc.Stream:
    """The stream of one call of ``endpoint``; ConfigError naming what it gave instead."""
    got: object = endpoint()
    if not inspect.isawaitable(got):
        raise ConfigError(f"the {role} returned {type(got).__name__}, not an awaitable")
    stream = await got
    if not isinstance(stream, trio.abc.Stream):
        raise ConfigError(f"the {role} gave {type(stream).__name__}, not a trio stream")
    return stream


__all__ = ["Acceptor", "Connector", "check_endpoint", "open_stream"]
