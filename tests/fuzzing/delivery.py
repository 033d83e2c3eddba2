"""Cases: a seed's connections after some mutations, made from (run seed, index) alone, and
their delivery to the destination in chunks of random sizes (memory streams or socketpairs)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .mutations import Mutator
from .recordings import load_recording, save_recording
from .seeds import Seed


@dataclass
class Case:
    """One input to the destination: the connections in accept order and how to deliver them."""

    seed: str
    method: str
    channels: int
    blocks: list[tuple[str, int]]
    conns: list[bytes]
    mutations: list[str]
    chunk_seed: int
    transport: str  # "memory" or "socket"
    known_zero: bool

    def save(self, path: Path) -> None:
        meta = {k: v for k, v in self.__dict__.items() if k != "conns"}
        save_recording(path, self.conns, {"case": meta})

    @classmethod
    def load(cls, path: Path) -> Case:
        conns, meta = load_recording(path)
        return cls(conns=conns, **meta["case"])


def make_case(seed: Seed, pool: Sequence[Seed], rng: random.Random) -> Case:
    conns = [bytearray(c) for c in seed.conns]
    mutations: list[str] = []
    r = rng.random()
    count = 0 if r < 0.06 else 1 if r < 0.6 else rng.choice((2, 2, 3, 4, 6))
    mutator = Mutator(rng, seed, pool)
    for _ in range(count):
        if not conns:
            break
        mutations.append(mutator.mutate(conns))
    if rng.random() < 0.3:
        rng.shuffle(conns)  # any accept order is fine
        mutations.append("(accept order shuffled)")
    return Case(
        seed=seed.name,
        method=seed.method,
        channels=seed.channels,
        blocks=list(seed.blocks),
        conns=[bytes(c) for c in conns],
        mutations=mutations,
        chunk_seed=rng.getrandbits(32),
        transport="socket" if rng.random() < 0.2 else "memory",
        known_zero=rng.random() < 0.5,
    )


def cases(seeds: Sequence[Seed], master_seed: int, start: int, count: int) -> Iterator[Case]:
    """Cases ``start .. start + count - 1`` of run ``master_seed``: each from its own RNG, so
    that one case is reproduced from (seed, index) alone."""
    for index in range(start, start + count):
        rng = random.Random(f"{master_seed}:{index}")
        seed = seeds[index % len(seeds)]
        yield make_case(seed, seeds, rng)


def chunk_sizes(rng: random.Random, total: int, max_reads: int) -> Iterator[int]:
    """Random read sizes: tiny, small, page-ish or large, about ``max_reads`` reads at most."""
    floor = max(1, total // max_reads)
    mode = rng.randrange(4)
    while True:
        if mode == 0:
            n = rng.randrange(1, 17)
        elif mode == 1:
            n = rng.randrange(1, 1500)
        elif mode == 2:
            n = rng.choice((1, 7, 64, 1343, 1344, 1345, 4096, 4097, 65536))
        else:
            n = rng.randrange(1, 300_000)
        yield max(n, floor)


class ReplayStream(trio.abc.Stream):
    """Delivers fixed bytes in chunks of random sizes, then EOF; what is sent to it is dropped."""

    def __init__(self, data: bytes, rng: random.Random, max_reads: int) -> None:
        self.data = data
        self.pos = 0
        self.sizes = chunk_sizes(rng, len(data), max_reads)
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        n = next(self.sizes)
        if max_bytes is not None:
            n = min(n, max_bytes)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def feed_socket(
    sock: trio.SocketStream, data: bytes, rng: random.Random, max_reads: int
) -> None:
    """Write ``data`` in random chunks, then close (EOF); a closed peer just ends it."""
    sizes = chunk_sizes(rng, len(data), max_reads)
    pos = 0
    try:
        while pos < len(data):
            n = next(sizes)
            await sock.send_all(data[pos : pos + n])
            pos += n
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sock.aclose()
