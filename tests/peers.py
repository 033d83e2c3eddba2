"""Hand-written sources, byte by byte, for the tests that break one rule of the protocol.

Each helper writes what our source (or QEMU) would, through any connect callable (a
``MemoryNetwork``'s or a TCP connector), so that a test can stop, cut or corrupt it exactly where
it wants; the destination side runs in ``multifd_core.testing.destination_against``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio

from multifd_core import Connector
from multifd_core.mainstream import MainStreamWriter
from multifd_core.wire import MULTIFD_FLAG_SYNC, MultiFDInit, MultiFDPacket

#: The blocks the hand-written sources announce unless told otherwise.
ONE_MIB_RAM = [("pc.ram", 1 << 20)]


def main_setup(blocks: Sequence[tuple[str, int]], end_round: bool = False) -> bytes:
    """The main stream's header and RAM setup for ``blocks``; with ``end_round``, the setup
    round's end too (the destination then waits for every channel's SYNC)."""
    w = MainStreamWriter()
    w.header()
    w.ram_setup(blocks)
    if end_round:
        w.eos()
    return w.take()


def sync_packet(num: int) -> bytes:
    """An empty multifd packet with the SYNC flag, numbered ``num``."""
    return MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, num, "", []).encode(128)


async def connect_channel(connect: Connector, cid: int, uuid: bytes = bytes(16)) -> trio.abc.Stream:
    """A new connection that says it is multifd channel ``cid`` of migration ``uuid``."""
    stream = await connect()
    await stream.send_all(MultiFDInit(cid, uuid).encode())
    return stream


async def open_channels(
    connect: Connector,
    n: int,
    end_round: bool = False,
    blocks: Sequence[tuple[str, int]] = ONE_MIB_RAM,
) -> tuple[trio.abc.Stream, list[trio.abc.Stream]]:
    """The main channel (its setup sent) and ``n`` multifd channels (their init sent)."""
    main = await connect()
    await main.send_all(main_setup(blocks, end_round))
    return main, [await connect_channel(connect, cid) for cid in range(n)]


async def aclose_all(streams: Sequence[trio.abc.AsyncResource]) -> None:
    """Close every stream a hand-written peer opened."""
    for stream in streams:
        await stream.aclose()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The destination's warnings about the connections it refused (``accept.py``), in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "multifd_core.accept" and r.levelno == logging.WARNING
    ]
