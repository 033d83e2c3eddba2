"""Embedding multifd in a trio program, typed: ``mypy --strict examples/embed/embed.py`` passes.

One process, two trio tasks, loopback TCP. A source migrates a numpy array (the "guest
memory") to a destination in a few rounds; beside each round a thread (a vCPU) writes into the
array and marks what it changed (``RAMBlock.mark_dirty`` is safe from any thread), so the next
round sends those pages again; the last round comes once the writes are done, and the
destination's copy equals the array. Then a second migration on the same acceptor is cancelled
after its first round: the source's stats say "cancelled", the destination fails with a typed
error, and nothing is left running.

    python examples/embed/embed.py [--size MIB] [--rounds N]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import trio

import multifd_core as mfd

PAGE = 4096
CHANNELS = 4
#: pages the vCPU thread writes beside each round
WRITES_PER_ROUND = 256
Memory = npt.NDArray[np.uint8]


def vcpu(memory: Memory, block: mfd.RAMBlock, seed: int) -> int:
    """Write into a few random pages of ``memory`` and mark them dirty, as a guest's vCPU
    would, from whatever thread runs this; returns the number of pages written."""
    rng = np.random.default_rng(seed)
    pages = rng.choice(len(memory) // PAGE, size=WRITES_PER_ROUND, replace=False)
    for page in pages.tolist():
        offset = page * PAGE + int(rng.integers(PAGE - 64))
        memory[offset : offset + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
        block.mark_dirty(offset, 64)  # after the write: this round or the next sends it
    return len(pages)


@dataclass
class Received:
    """What a destination task ended with."""

    copy: Memory | None = None
    stats: mfd.MigrationStats | None = None
    error: mfd.MultiFDError | None = None


async def destination(accept: mfd.Acceptor, out: Received) -> None:
    """Receive one migration into fresh memory; keep a copy of it, or the error."""
    try:
        async with mfd.open_destination(accept, channels=CHANNELS, idle_timeout=30.0) as dst:
            out.stats = await dst.wait()
            out.copy = np.frombuffer(dst.blocks["guest"].host, dtype=np.uint8).copy()
    except mfd.MultiFDError as exc:  # every failure is one of the library's errors
        out.error = exc


async def live_migration(
    memory: Memory, block: mfd.RAMBlock, connect: mfd.Connector, rounds: int
) -> mfd.MigrationStats:
    """``rounds`` rounds, a vCPU thread writing beside each one but the last."""
    options = mfd.SourceOptions(channels=CHANNELS, method="none")
    async with mfd.open_source([block], connect, options, idle_timeout=30.0) as src:
        for n in range(rounds - 1):
            async with trio.open_nursery() as nursery:  # the round and the writes, at once
                nursery.start_soon(trio.to_thread.run_sync, vcpu, memory, block, n)
                sent = await src.send_round()
            print(f"round {n + 1}: {sent} pages sent, {src.dirty_pages()} dirty for the next")
        return await src.complete()  # the last round: what is still dirty, then the end
    raise AssertionError("unreachable")  # open_source re-raises whatever ends it early


async def cancelled_migration(block: mfd.RAMBlock, connect: mfd.Connector) -> mfd.MigrationStatus:
    """A migration cancelled after its first round (a stop button, a shutdown: any trio
    cancellation); the source closes its channels and its stats say so."""
    with trio.CancelScope() as stop:
        async with mfd.open_source([block], connect, channels=CHANNELS) as src:
            await src.send_round()
            stop.cancel()
            await src.complete()  # cancelled at its first checkpoint
    assert stop.cancelled_caught
    return src.stats.status


async def main(size: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    memory: Memory = np.zeros(size, dtype=np.uint8)  # half random, half zero pages
    memory[: size // 2] = rng.integers(0, 256, size // 2, dtype=np.uint8)
    block = mfd.RAMBlock("guest", memory)
    async with await mfd.open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        connect = mfd.tcp_connector("127.0.0.1", acceptor.port)

        got = Received()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(destination, acceptor, got)
            stats = await live_migration(memory, block, connect, rounds)
        if got.copy is None or not np.array_equal(got.copy, memory):
            raise SystemExit(f"the destination's copy differs from the source's: {got.error}")
        print(f"migrated: {stats.status}, {stats.rounds} rounds, {stats.normal_pages} pages")

        got = Received()  # the acceptor serves one destination at a time: the next one now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(destination, acceptor, got)
            status = await cancelled_migration(block, connect)
        if status != "cancelled" or got.error is None:
            raise SystemExit(f"expected a cancelled migration, got {status} / {got.error}")
        print(f"cancelled: source {status}; destination {type(got.error).__name__}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=16, help="MiB of guest memory (16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the live migration (3)")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    trio.run(main, args.size << 20, args.rounds)
