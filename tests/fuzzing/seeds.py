"""Seeds: valid migrations to mutate, from our own source (recorded into memory) and from the
recordings of a real QEMU 7.2 source in tests/data."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from multifd_core import RAMBlock, open_source

from .recordings import DATA_DIR, PS, load_recording
from .reference import model

T = TypeVar("T")


@dataclass
class Seed:
    """A valid migration: each connection's bytes (main first), how to receive it, and the
    memory it must produce (None: ask the model, e.g. for a QEMU recording)."""

    name: str
    method: str
    channels: int
    conns: list[bytes]
    blocks: list[tuple[str, int]]
    expected: dict[str, bytes] | None = None


class RecordingStream(trio.abc.Stream):
    """A stream that keeps what is sent to it (the source never reads)."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.data += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def source_memory(rng: random.Random, pages: int) -> bytearray:
    """Zero, random, single-byte, text and one-non-zero-byte pages."""
    mem = bytearray(pages * PS)
    for i in range(pages):
        kind = rng.randrange(6)
        at = i * PS
        if kind == 0:
            continue  # zero
        if kind == 1:
            mem[at : at + PS] = rng.randbytes(PS)
        elif kind == 2:
            mem[at : at + PS] = bytes((rng.randrange(1, 256),)) * PS
        elif kind == 3:
            text = f"page {i} of a guest; ".encode() * (PS // 16)
            mem[at : at + PS] = text[:PS]
        elif kind == 4:
            mem[at + rng.randrange(PS)] = rng.randrange(1, 256)
        else:
            mem[at : at + PS] = rng.randbytes(64) * (PS // 64)
    return mem


async def record_source(
    method: str, channels: int, layout: Sequence[tuple[str, int]], rounds: int, rng_seed: int
) -> Seed:
    """Run our own source into recording streams: ``rounds`` rounds, pages changed between."""
    rng = random.Random(rng_seed)
    mems = [source_memory(rng, pages) for _, pages in layout]
    blocks = [RAMBlock(name, mem, PS) for (name, _), mem in zip(layout, mems, strict=True)]
    streams: list[RecordingStream] = []

    async def connect() -> trio.abc.Stream:
        s = RecordingStream()
        streams.append(s)
        return s

    async with open_source(blocks, connect, channels=channels, method=method) as src:
        for _ in range(rounds - 1):
            await src.send_round()
            for block, mem in zip(blocks, mems, strict=True):
                for _ in range(max(1, block.npages // 8)):
                    page = rng.randrange(block.npages)
                    if rng.random() < 0.3:
                        mem[page * PS : page * PS + PS] = bytes(PS)  # non-zero -> zero
                    else:
                        mem[page * PS + rng.randrange(PS)] = rng.randrange(1, 256)
                    block.mark_dirty(page * PS, 1)
        await src.complete()
    return Seed(
        name=f"ours-{method}-{channels}ch-{rounds}r-{rng_seed}",
        method=method,
        channels=channels,
        conns=[bytes(s.data) for s in streams],
        blocks=[(name, pages * PS) for name, pages in layout],
        expected={b.name: bytes(m) for b, m in zip(blocks, mems, strict=True)},
    )


OUR_SEEDS: tuple[tuple[str, int, tuple[tuple[str, int], ...], int], ...] = tuple(
    (method, channels, layout, rounds)
    for method in ("none", "zlib", "zstd", "lz4")
    for channels, layout, rounds in (
        (1, (("pc.ram", 96),), 2),
        (2, (("pc.ram", 192), ("pc.bios", 64)), 2),
        (2, (("ram", 64),), 3),
    )
)


def our_seeds() -> list[Seed]:
    """Streams from our own source: every method, 1 and 2 channels, 2-3 rounds."""

    async def make() -> list[Seed]:
        return [
            await record_source(method, channels, layout, rounds, rng_seed=i)
            for i, (method, channels, layout, rounds) in enumerate(OUR_SEEDS)
        ]

    return deterministic(make)


async def _inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return fn(*args)


def deterministic(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(fn)``, the same in every process, so that a case is reproduced from its run
    seed and index alone.

    Worker-thread jobs (compression, zero scans) run inline, and the run is one Hypothesis
    example: Trio registers its scheduler's random generator with Hypothesis
    (``hypothesis.register_random``, from Trio's Hypothesis plugin), which seeds it for each
    example and restores it after, and schedules deterministically once Hypothesis is imported.
    """
    out: list[T] = []

    @settings(
        max_examples=1,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.just(None))
    def once(_: None) -> None:
        if not out:
            out.append(trio.run(fn))

    threaded = trio.to_thread.run_sync
    trio.to_thread.run_sync = _inline  # type: ignore[assignment]
    try:
        once()
    finally:
        trio.to_thread.run_sync = threaded
    return out[0]


def qemu_seeds() -> list[Seed]:
    """The recordings of a real QEMU 7.2 source in tests/data."""
    seeds = []
    for path in sorted(DATA_DIR.glob("qemu72-*.rec.xz")):
        conns, meta = load_recording(path)
        verdict = model(conns, meta["method"], meta["channels"], None)
        if verdict.status != "valid":
            raise AssertionError(f"{path.name} is not a valid stream: {verdict.reason}")
        seeds.append(
            Seed(
                name=path.name.removesuffix(".rec.xz"),
                method=meta["method"],
                channels=meta["channels"],
                conns=conns,
                blocks=list(verdict.blocks),
            )
        )
    return seeds


def all_seeds() -> list[Seed]:
    return our_seeds() + qemu_seeds()
