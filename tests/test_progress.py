"""The progress API (``Source.progress()``, ``Destination.progress()``): per packet, a fraction
that never passes 1.0 and never goes back within a round, totals that add up across rounds.

Each migration runs over loopback TCP; a side task polls both ends at every scheduler tick
(``trio.sleep(0)``), as a display would, only more often.
"""

from __future__ import annotations

import os
import random

import pytest
import trio

from multifd_core import MigrationStats, Progress, RAMBlock
from multifd_core.image import dirty_some_pages
from multifd_core.options import DEFAULT_PACKET_SIZE
from multifd_core.testing import LoopbackRun, image_blocks, run_loopback

PS = 4096
PACKET = DEFAULT_PACKET_SIZE // PS  # pages per packet between our own ends


class Poll:
    """Both ends' progress, taken at every tick of the run until the source ended."""

    def __init__(self) -> None:
        self.src: list[Progress] = []
        self.dst: list[Progress] = []

    async def run(self, run: LoopbackRun) -> None:
        assert run.source is not None
        while True:
            self.src.append(run.source.progress())
            if run.dst.destination is not None:
                self.dst.append(run.dst.destination.progress())
            await trio.sleep(0)

    def start(self, _round: int, run: LoopbackRun) -> None:
        run.start_soon(self.run, run)


def random_block(size: int) -> RAMBlock:
    return RAMBlock("pc.ram", bytearray(os.urandom(size)), PS)


def check_rounds(samples: list[Progress]) -> None:
    """Within each round: one plan, a fraction in [0, 1] that never goes back."""
    by_round: dict[int, list[Progress]] = {}
    for p in samples:
        by_round.setdefault(p.round, []).append(p)
    for number, ps in by_round.items():
        fractions = [p.fraction for p in ps]
        assert fractions == sorted(fractions), f"round {number} went back"
        assert all(0.0 <= f <= 1.0 for f in fractions), f"round {number}: {max(fractions)}"
        assert [p.round_pages_done for p in ps] == sorted(p.round_pages_done for p in ps)
        if ps[0].role == "source" and number:
            assert {p.round_pages for p in ps} == {ps[0].round_pages}, "the plan moved"


@pytest.mark.parametrize("zero_pages", ["legacy", "multifd"])
async def test_one_round_moves_packet_by_packet(zero_pages: str) -> None:
    """A 64 MiB block (one window of the scan) in one round: the source's fraction takes a
    value per packet or two, not one per window, and ends at exactly 1.0."""
    block = random_block(64 << 20)
    poll = Poll()
    opts = {"channels": 2}
    run = await run_loopback(
        [block],
        transport="tcp",
        on_open=poll.start,
        source={**opts, "zero_page_detection": zero_pages},
        destination=opts,
    )
    npages = block.npages
    during = [p for p in poll.src if p.round == 1]
    check_rounds(poll.src)
    # the channels count a packet each per tick at most: a value for every second packet
    assert len({p.fraction for p in during}) >= npages // PACKET // 2
    assert all(p.round_pages == npages for p in during)
    assert all(p.fraction == p.round_pages_done / npages for p in during if p.status == "active")
    assert [p.round for p in poll.src] == sorted(p.round for p in poll.src)
    assert poll.src[0].fraction == 0.0 and poll.src[0].pages == 0

    assert run.source is not None
    end = run.source.progress()
    assert (end.status, end.round, end.rounds_done, end.fraction) == ("completed", 1, 1, 1.0)
    assert end.round_pages == end.round_pages_done == end.pages == end.total_pages == npages
    assert end.round_bytes == end.bytes == end.total_bytes == 64 << 20
    assert run.src_stats is not None and end.wire_bytes == run.src_stats.wire_bytes
    assert end.seconds > 0 and end.throughput > 0

    # the destination: every page is in the first round; its fraction moves with the packets
    fractions = [p.fraction for p in poll.dst]
    assert fractions == sorted(fractions) and max(fractions) <= 1.0
    assert len(set(fractions)) >= npages // PACKET // 2
    assert all(p.round_pages is None for p in poll.dst)


async def test_zero_pages_count_as_their_records_go() -> None:
    """Two blocks of zero, random and text pages, their zero pages sent as main-stream records
    (QEMU 7.2's way): the round's plan is both blocks' pages from its start, and the round ends
    at 1.0 with every page, zero or not; the destination counts the same pages."""
    blocks = image_blocks({"pc.ram": 8 << 20, "pc.bios": 1 << 20})  # VM-like pages
    npages = sum(b.npages for b in blocks)
    poll = Poll()
    run = await run_loopback(
        blocks, on_open=poll.start, source={"channels": 2}, destination={"channels": 2}
    )
    stats = run.src_stats
    assert stats is not None and stats.zero_record_pages > 0
    check_rounds(poll.src)
    assert {p.round_pages for p in poll.src if p.round} == {npages}
    assert run.source is not None and run.dst.destination is not None
    src, dst = run.source.progress(), run.dst.destination.progress()
    assert src.pages == src.round_pages_done == npages == stats.normal_pages + stats.zero_pages
    assert (dst.pages, dst.round_pages_done, dst.fraction) == (npages, npages, 1.0)


async def test_rounds_add_up() -> None:
    """Three rounds, pages dirtied between them and during them: each round's plan is the
    pages dirty when it started, the fraction restarts from 0 each round and ends it at 1.0,
    and the totals are the sum of the rounds."""
    block = random_block(8 << 20)
    rng = random.Random(14)
    poll = Poll()
    plans: list[int] = [block.npages]
    ends: list[Progress] = []
    written = trio.Event()

    async def guest(run: LoopbackRun) -> None:
        """Writes pages while round 2 runs: they go in round 3, never in round 2's plan."""
        assert run.source is not None
        while run.source.progress().round < 2:
            await trio.sleep(0)
        for offset in dirty_some_pages(block.memory, PS, 50, rng, 99):
            block.mark_dirty(offset)
            await trio.sleep(0)
        written.set()

    def on_open(r: int, run: LoopbackRun) -> None:
        poll.start(r, run)
        run.start_soon(guest, run)

    async def between_rounds(r: int, run: LoopbackRun) -> None:
        assert run.source is not None
        ends.append(run.source.progress())
        if r == 2:
            with trio.fail_after(10):
                await written.wait()
        for offset in dirty_some_pages(block.memory, PS, 300, rng, r):
            block.mark_dirty(offset)
        plans.append(run.source.dirty_pages())

    run = await run_loopback(
        [block],
        transport="tcp",
        rounds=3,
        on_open=on_open,
        between_rounds=between_rounds,
        source={"channels": 3},
        destination={"channels": 3},
    )
    assert run.source is not None and run.dst.destination is not None
    ends.append(run.source.progress())
    check_rounds(poll.src)
    for number, (plan, end) in enumerate(zip(plans, ends, strict=True), start=1):
        assert (end.round, end.rounds_done) == (number, number)
        assert end.round_pages == end.round_pages_done == plan
        assert end.fraction == 1.0
    assert {p.round for p in poll.src} >= {1, 2, 3}
    total = ends[-1]
    assert total.pages == sum(plans) > block.npages
    stats: MigrationStats | None = run.src_stats
    assert stats is not None and total.pages == stats.normal_pages + stats.zero_pages
    assert total.total_pages == block.npages

    # the destination: the same rounds and pages; its fraction is of the RAM, capped
    dst = run.dst.destination.progress()
    assert (dst.rounds_done, dst.round, dst.pages) == (3, 3, total.pages)
    dstats = run.dst_stats
    assert dstats is not None and (dst.status, dst.rounds_done) == ("completed", dstats.rounds)
    assert dst.pages == dstats.normal_pages + dstats.zero_pages + dstats.inline_pages
    assert (dst.wire_bytes, dst.total_bytes) == (dstats.wire_bytes, dstats.total_bytes)
    assert dst.round_pages_done == plans[-1]  # the last round's pages
    fractions = [p.fraction for p in poll.dst]
    assert fractions == sorted(fractions) and max(fractions) == 1.0
    assert all(p.fraction == min(1.0, p.pages / block.npages) for p in poll.dst if p.round)
    assert dst.fraction == 1.0


def test_a_snapshot_is_frozen() -> None:
    stats = MigrationStats("source", 1, "none", PS)
    stats.start(10 * PS)
    before = stats.progress()
    assert (before.round, before.fraction, before.round_pages) == (0, 0.0, 0)
    stats.round_start(4)
    c = stats.add_channel(0)
    stats.packet(c, normal_pages=3, header_bytes=1, payload_bytes=3 * PS, sync=False)
    now = stats.progress()
    assert (now.round, now.round_pages_done, now.fraction) == (1, 3, 0.75)
    assert before.round_pages_done == 0  # a snapshot: taken once, never changing
    with pytest.raises(AttributeError):
        now.fraction = 0.5  # type: ignore[misc]
    stats.packet(c, normal_pages=1, header_bytes=1, payload_bytes=PS, sync=False)
    stats.round_done()
    assert stats.progress().fraction == 1.0
    stats.round_start(0)  # a round with nothing dirty is done from its start
    assert stats.progress().fraction == 1.0
