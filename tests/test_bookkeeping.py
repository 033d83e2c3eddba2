"""A block's bookkeeping: one bit per page (bitmap.py), marks from any thread, and what a
receiver pays for announcing a 1 TiB block."""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import connect_channel, sync_packet
from procs import finish, receiver

from multifd_core import RAMBlock, bitmap, landing
from multifd_core.bitmap import PageBitmap, iter_set
from multifd_core.mainstream import MainStreamWriter
from multifd_core.returnpath import MIG_RP_MSG_PONG, ReturnPathParser
from multifd_core.testing import LoopbackRun, run_loopback
from multifd_core.wire import MultiFDPacket

PS = 4096
MiB = 1 << 20
TiB = 1 << 40

# --- PageBitmap against a model: a bool per page ------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("range"), st.integers(0, 299), st.integers(0, 299)),
        st.tuples(st.just("pages"), st.lists(st.integers(0, 299), max_size=20)),
        st.tuples(st.just("clear"), st.lists(st.integers(0, 299), max_size=20)),
        st.tuples(st.just("one"), st.integers(0, 299)),
        st.tuples(st.just("unset"), st.integers(0, 299)),
        st.tuples(st.just("all")),
    ),
    max_size=12,
)


def _apply(bm: PageBitmap, model: np.ndarray, op: tuple) -> None:  # type: ignore[type-arg]
    n = bm.npages
    kind = op[0]
    if kind == "range":
        a, b = sorted((op[1] % (n + 1), op[2] % (n + 1)))
        bm.set_range(a, b)
        model[a:b] = True
    elif kind in ("pages", "clear"):
        pages = [p % n for p in op[1]]
        (bm.set_pages if kind == "pages" else bm.clear_pages)(pages)
        model[pages] = kind == "pages"
    elif kind == "one":
        bm.set(op[1] % n)
        model[op[1] % n] = True
    elif kind == "unset":
        bm.clear(op[1] % n)
        model[op[1] % n] = False
    else:
        bm.set_all()
        model[:] = True


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(npages=st.integers(1, 300), ops=_ops, window=st.tuples(st.integers(), st.integers()))
def test_page_bitmap_matches_a_bool_per_page(monkeypatch, npages, ops, window) -> None:
    monkeypatch.setattr(bitmap, "CHUNK", 16)  # whole-map walks in several chunks
    bm = PageBitmap(npages)
    model = np.zeros(npages, dtype=bool)
    for op in ops:
        _apply(bm, model, op)
    # the documented layout: numpy's little bit order, no bit set past the last page
    assert bm.bits.tobytes() == np.packbits(model, bitorder="little").tobytes()
    assert bm.nbytes == (npages + 7) // 8
    start, stop = sorted((window[0] % (npages + 1), window[1] % (npages + 1)))
    assert bm.pages(start, stop).tolist() == (np.flatnonzero(model[start:stop])).tolist()
    assert bm.any(start, stop) == bool(model[start:stop].any())
    assert bm.count(start, stop) == int(model[start:stop].sum())
    assert bm.count() == int(model.sum())
    assert list(iter_set(bm)) == np.flatnonzero(model).tolist()
    probe = list(range(npages))
    assert bm.test_pages(probe).tolist() == model.tolist()
    assert [bm.test(p) for p in probe] == model.tolist()


@given(pages=st.lists(st.integers(0, 63), min_size=1, max_size=20))
def test_mark_written_marks_every_page_and_none_outside_their_span(pages: list[int]) -> None:
    """landing.mark_written: a run (in any order) is marked as one range, scattered pages one by
    one; either way every page is marked (one left out would keep stale data under a later
    zero record), and nothing outside [lowest, highest]."""
    block = RAMBlock.allocate("ram", 64 * PS)
    landing.mark_written(block, [p * PS for p in pages])
    assert block.written is not None
    marked = set(iter_set(block.written))
    assert set(pages) <= marked <= set(range(min(pages), max(pages) + 1))
    if len(set(pages)) == len(pages):  # no repeats: exactly the pages
        assert marked == set(pages)
    block.close()


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_a_tib_of_pages_costs_a_bit_each_and_walks_stay_bounded() -> None:
    """The bits of a 1 TiB block: 32 MiB; counting and iterating them unpacks one chunk at a
    time (a whole-map unpack would take 256 MiB more at its peak)."""
    npages = TiB // PS
    bm = PageBitmap(npages)
    assert bm.nbytes == 32 * MiB
    bm.set_all()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's peak RSS (VmHWM) to its current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    assert bm.count() == npages
    assert bm.count(3, npages - 5) == npages - 8  # unaligned edges
    sparse = PageBitmap(npages)
    sparse.set_pages([0, 12345, npages // 2, npages - 1])
    assert list(iter_set(sparse)) == [0, 12345, npages // 2, npages - 1]
    assert sparse.count() == 4
    peak_growth = (_status_kib("VmHWM") - before) * 1024
    assert peak_growth < 40 * MiB, f"walking the bitmap took {peak_growth / MiB:.0f} MiB"


def test_a_destination_block_has_no_dirty_bitmap() -> None:
    block = RAMBlock.allocate("ram", 64 * PS)
    assert block._dirty is None and block.dirty_count() == 0
    assert block.written is not None and block.written.nbytes == 8
    taken = block.sync_dirty_bitmap()  # nothing marked: an empty map, still none kept
    assert taken.count() == 0 and block._dirty is None
    block.mark_dirty(3 * PS, 2 * PS)
    assert block.dirty_count() == 2
    assert block.sync_dirty_bitmap().pages(0, 64).tolist() == [3, 4]
    assert block._dirty is None
    block.close()


# --- marks from other threads --------------------------------------------------------------


def _bits(bm: PageBitmap) -> np.ndarray:  # type: ignore[type-arg]
    return np.unpackbits(bm.bits, bitorder="little")[: bm.npages].astype(bool)


def _lost_marks(npages: int) -> int:
    """Eight threads mark pages that share every byte of the bitmap (thread i: pages i, i+8,
    ...), once each, while another thread takes the bitmap over and over; the pages in none of
    the bitmaps taken."""
    block = RAMBlock("ram", bytearray(npages * PS))
    seen = np.zeros(npages, dtype=bool)
    stop = threading.Event()

    def mark(i: int) -> None:
        for page in range(i, npages, 8):
            block.mark_dirty(page * PS)

    def sync() -> None:
        nonlocal seen
        while not stop.is_set():
            seen |= _bits(block.sync_dirty_bitmap())

    markers = [threading.Thread(target=mark, args=(i,)) for i in range(8)]
    syncer = threading.Thread(target=sync)
    for t in [syncer, *markers]:
        t.start()
    for t in markers:
        t.join(20)
    stop.set()
    syncer.join(20)
    assert not any(t.is_alive() for t in [syncer, *markers])
    seen |= _bits(block.sync_dirty_bitmap())
    return npages - int(seen.sum())


def test_marks_racing_syncs_and_each_other_are_never_lost() -> None:
    """Without the lock this loses marks in most repetitions (the read-modify-write of a
    shared byte, a mark into a bitmap already taken, two threads making the fresh bitmap
    after a sync: marks lost in 17 to 19 of 20 repetitions, measured)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads finely
    try:
        lost = [_lost_marks(8 * 2048) for _ in range(10)]
    finally:
        sys.setswitchinterval(interval)
    assert lost == [0] * 10


# --- marks from other threads while a real migration takes the bitmaps ---------------------

WRITERS = 2
ROUNDS = 8
#: Marks each writer makes between two rounds at least (the hook waits for them).
MARKS_PER_ROUND = 2000


class Writers:
    """Threads that change random pages of ``block`` and mark them, as vCPUs would, until
    stopped; ``wait_marks`` blocks until each made MARKS_PER_ROUND more marks."""

    def __init__(self, block: RAMBlock) -> None:
        self.block = block
        self.stop = threading.Event()
        self.marks = [0] * WRITERS
        self.cond = threading.Condition()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(WRITERS)
        ]

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        block, npages = self.block, self.block.npages
        while not self.stop.is_set():
            page = rng.randrange(npages)
            run = rng.choice((1, 1, 1, 3, 9))  # single pages and ranges across bytes
            run = min(run, npages - page)
            stamp = (i << 32 | self.marks[i]).to_bytes(8, "little")
            block.host[page * PS : (page + run) * PS] = stamp * (run * PS // 8)
            block.mark_dirty(page * PS, run * PS)
            with self.cond:
                self.marks[i] += 1
                self.cond.notify_all()

    def wait_marks(self) -> None:
        with self.cond:
            want = [m + MARKS_PER_ROUND for m in self.marks]
            done = self.cond.wait_for(
                lambda: all(m >= w for m, w in zip(self.marks, want, strict=True)), timeout=20
            )
        assert done, "the writer threads stopped marking"


async def test_marks_from_threads_during_rounds_are_never_lost() -> None:
    """Two threads change and mark pages (single pages and ranges) without pause while a
    migration over TCP runs rounds and takes the dirty bitmap; they stop before the last round.
    The destination must then equal the source, every page's last change sent: marks made
    while a round takes and scans the bitmap reach a later round. (Only a mark lost near the
    end shows here, since later marks of the same page hide earlier losses: the lock itself is
    proven by the test above; without it this one still passed in 3 of 3 runs.)"""
    block = RAMBlock("ram", bytearray(1024 * PS))
    writers = Writers(block)

    async def between_rounds(r: int, run: LoopbackRun) -> None:
        if r == 1:
            for t in writers.threads:
                t.start()
        await trio.to_thread.run_sync(writers.wait_marks)  # rounds 2.. run amid marks
        if r == ROUNDS - 1:
            writers.stop.set()
            for t in writers.threads:
                await trio.to_thread.run_sync(t.join, 20)
                assert not t.is_alive()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the writers and the migration interleave finely
    try:
        run = await run_loopback(
            [block],
            transport="tcp",
            rounds=ROUNDS,
            between_rounds=between_rounds,
            source={"channels": 2},
            destination={"channels": 2},
        )
    finally:
        writers.stop.set()
        sys.setswitchinterval(interval)
    assert sum(writers.marks) >= (ROUNDS - 1) * WRITERS * MARKS_PER_ROUND
    got = run.dst_blocks["ram"].host.tobytes()
    want = bytes(block.memory)
    stale = [
        p for p in range(block.npages) if got[p * PS : (p + 1) * PS] != want[p * PS : (p + 1) * PS]
    ]
    assert not stale, f"{len(stale)} pages stale at the destination, first {stale[:5]}"


# --- what a receiver pays for announcing a 1 TiB block -------------------------------------

#: One page written in every STRIDE pages: a bit in every 4 KiB page of the written bitmap, so
#: that all of its 32 MiB is in memory (calloc'd bits never set would cost nothing).
STRIDE = 8 * PS
TIB_BLOCK = "pc.ram"


def _stamp(page: int) -> bytes:
    return page.to_bytes(8, "little") * (PS // 8)


async def _tib_source(port: int, measure: trio.abc.SendChannel[None]) -> None:
    """A source of one 1 TiB block that sends one page every STRIDE pages in a round, then a
    PING: its PONG comes once the round's sync barrier passed, every page landed; it waits on
    ``measure`` (the test reads the receiver's memory), then ends the migration."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    pages = list(range(0, TiB // PS, STRIDE))
    main = await connect()
    chans = [await connect_channel(connect, cid) for cid in range(2)]
    w = MainStreamWriter()
    w.header()
    w.open_return_path()
    w.ram_setup([(TIB_BLOCK, TiB)])
    await main.send_all(w.take())
    for ch in chans:
        await ch.send_all(sync_packet(0))  # the setup's sync
    w.eos()
    w.section_part()
    await main.send_all(w.take())
    for n, i in enumerate(range(0, len(pages), 128)):
        part = pages[i : i + 128]
        offsets = [p * PS for p in part]
        head = MultiFDPacket(0, 128, len(part), len(part) * PS, n + 1, TIB_BLOCK, offsets)
        await chans[n % 2].send_all(head.encode(128) + b"".join(map(_stamp, part)))
    for ch in chans:
        await ch.send_all(sync_packet(10_000))
    w.eos()
    w.ping(2)
    await main.send_all(w.take())
    parser = ReturnPathParser()
    while not any(m.type == MIG_RP_MSG_PONG and m.value == 2 for m in _messages(parser)):
        data = await main.receive_some()
        assert data, "the receiver closed its return path"
        parser.feed(data)
    await measure.send(None)
    await measure.send(None)  # the test has measured
    w.section_end()
    w.eos()
    w.eof()
    await main.send_all(w.take())
    for ch in chans:
        await ch.send_all(sync_packet(10_001))
    for stream in [*chans, main]:
        await stream.aclose()


def _messages(parser: ReturnPathParser) -> list:  # type: ignore[type-arg]
    got = []
    while (msg := parser.next_message()) is not None:
        got.append(msg)
    return got


async def test_announcing_a_tib_block_costs_the_receiver_a_bit_per_page(tmp_path: Path) -> None:
    """``multifd recv`` given one 1 TiB block (the default --max-size allows exactly 1 TiB), one
    page written every 32 Ki pages across it (8192 pages into its sparse file, by pwrite: not
    in the receiver's memory): its peak RSS grows by the written bitmap's 32 MiB and its
    buffers, under 80 MiB. A byte per page in two bitmaps cost 555 MiB on the main before."""
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "2", timeout=60) as (recv, port):
        idle = _status_kib("VmRSS", recv.pid) * 1024  # listening, everything imported
        measure_send, measure = trio.open_memory_channel[None](0)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_tib_source, port, measure_send)
                await measure.receive()
                peak = _status_kib("VmHWM", recv.pid) * 1024
                await measure.receive()
        got = await trio.to_thread.run_sync(finish, recv)
    assert got.rc == 0, got.err
    growth = peak - idle
    assert growth < 80 * MiB, f"the receiver's RSS grew by {growth / MiB:.0f} MiB"
    with open(out_dir / TIB_BLOCK, "rb") as f:
        assert os.fstat(f.fileno()).st_size == TiB
        for page in (0, STRIDE, TiB // PS - STRIDE):
            assert os.pread(f.fileno(), PS, page * PS) == _stamp(page)
        assert os.pread(f.fileno(), PS, PS) == bytes(PS)
