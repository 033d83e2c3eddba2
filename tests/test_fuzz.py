"""Fuzzing the destination: mutated streams of our source and of a real QEMU 7.2, generated ones.

Every case must end by itself, within a bound, completed with the memory the reference model
expects or with a ``MultiFDError``; never untyped, never writing outside a block (guard bytes),
never past the memory bound (tracemalloc). ``tests/fuzzing/`` has the machinery; the long
run is ``fuzz/run.py`` (fuzz/README.md).
"""

from __future__ import annotations

import collections
import os
import random
import struct
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import fuzzing as fh

from multifd_core import MemoryNetwork, RAMBlock, open_destination
from multifd_core.mainstream import MainStreamWriter
from multifd_core.wire import MULTIFD_FLAG_SYNC, MultiFDInit, MultiFDPacket

#: Mutated cases per CI run (deterministic: run seed 2024, cases 0..N-1).
CI_CASES = 2000
#: Memory traced in one case of this many (tracemalloc makes a case ~4x slower).
CI_TRACE_EVERY = 8
#: Fewer, larger reads than the long run's 400 a connection: CI time.
CI_MAX_READS = 150
PS = fh.PS


@pytest.fixture(scope="module")
def seeds() -> list[fh.Seed]:
    return fh.all_seeds()


def by_name(seeds: list[fh.Seed], prefix: str) -> fh.Seed:
    return next(s for s in seeds if s.name.startswith(prefix))


def assert_ok(res: fh.Result, case: fh.Case) -> None:
    assert not res.violation, (
        f"{res.outcome}: {res.detail[-3000:]}\nmutations {case.mutations}\nmodel {res.verdict}"
    )


# --- seeds ------------------------------------------------------------------------------------


def test_qemu_recordings_are_small_and_present() -> None:
    files = sorted(fh.DATA_DIR.glob("qemu72-*.rec.xz"))
    assert {f.name for f in files} >= {"qemu72-none-2ch.rec.xz", "qemu72-zstd-2ch.rec.xz"}
    assert sum(f.stat().st_size for f in files) < 1 << 20
    conns, meta = fh.load_recording(files[0])
    assert meta["source"].startswith("QEMU emulator version 7.2")
    assert conns[0][:4] == b"QEVM" and all(c[:4] == b"\x11\x22\x33\x44" for c in conns[1:])


def test_every_seed_replays_unchanged(seeds: list[fh.Seed]) -> None:
    """Unmutated, each seed (ours: every method, 1-2 channels; QEMU's) completes correctly, and
    the model's memory equals the source's."""
    assert {s.method for s in seeds} == {"none", "zlib", "zstd", "lz4"}
    assert any(s.name.startswith("qemu72-none") for s in seeds)
    assert any(s.name.startswith("qemu72-zstd") for s in seeds)
    for seed in seeds:
        res = fh.check_seed(seed)
        assert res.outcome == "completed-correct", (seed.name, res.outcome, res.detail)
        assert res.peak < fh.memory_bound(fh.Case(seed.name, seed.method, seed.channels,
                                                  seed.blocks, seed.conns, [], 0, "memory",
                                                  False), fh.Config())  # fmt: skip


@pytest.mark.parametrize("transport", ["memory", "socket"])
def test_qemu_recording_in_any_order_and_chunking(seeds: list[fh.Seed], transport: str) -> None:
    seed = by_name(seeds, "qemu72-zstd")
    for i in range(3):
        conns = list(seed.conns)
        random.Random(i).shuffle(conns)
        case = fh.Case(seed.name, seed.method, seed.channels, seed.blocks, conns, ["shuffled"],
                       i, transport, i % 2 == 0)  # fmt: skip
        res = fh.run_case(case)
        assert res.outcome == "completed-correct", res.detail


# --- the harness catches what it must ---------------------------------------------------------


def test_harness_flags_a_hang(seeds: list[fh.Seed]) -> None:
    """A missing connection with a connect timeout beyond the bound is reported as a hang."""
    seed = by_name(seeds, "ours-none-1ch")
    case = fh.Case(seed.name, "none", 1, seed.blocks, seed.conns[:1], ["drop"], 0, "memory", True)
    res = fh.run_case(case, fh.Config(connect_timeout=5, idle_timeout=5, bound=0.3))
    assert res.outcome == "VIOLATION:hang"
    res = fh.run_case(case, fh.Config(connect_timeout=0.2))
    assert res.outcome == "MigrationTimeout"


def test_harness_flags_memory_and_wrong_data(
    seeds: list[fh.Seed], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = by_name(seeds, "ours-none-1ch")
    case = fh.Case(seed.name, "none", 1, seed.blocks, seed.conns, [], 0, "memory", False)
    monkeypatch.setattr(fh.runner, "memory_bound", lambda case, cfg: 1000)
    assert fh.run_case(case).outcome == "VIOLATION:memory"
    monkeypatch.undo()
    # a model that expects other bytes for one page: the comparison must notice
    real_model = fh.model

    def skewed(*args: object, **kwargs: object) -> fh.Verdict:
        verdict = real_model(*args, **kwargs)  # type: ignore[arg-type]
        key = next(iter(verdict.final))
        verdict.final[key] = {b"\x01" * PS}
        return verdict

    monkeypatch.setattr(fh.runner, "model", skewed)
    assert fh.run_case(case).outcome == "VIOLATION:wrong-data"


def test_harness_flags_writes_outside_a_block(
    seeds: list[fh.Seed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks whose view runs into the guard (as a bad offset check would let a write do)."""
    seed = by_name(seeds, "ours-none-1ch")
    case = fh.Case(seed.name, "none", 1, seed.blocks, seed.conns, [], 0, "memory", False)
    real = fh.runner._guarded

    def leaky(case: fh.Case) -> tuple[list[RAMBlock], list[bytearray], list[bytes]]:
        blocks, backings, initial = real(case)
        name, size = case.blocks[0]
        view = memoryview(backings[0])[fh.GUARD + PS : fh.GUARD + PS + size]  # shifted a page
        blocks[0] = RAMBlock(name, view, PS)
        return blocks, backings, initial

    monkeypatch.setattr(fh.runner, "_guarded", leaky)
    assert fh.run_case(case).outcome == "VIOLATION:write-outside-block"


# --- the mutation fuzzer ----------------------------------------------------------------------


def test_mutation_fuzz(seeds: list[fh.Seed]) -> None:
    """CI_CASES mutated cases (bit flips, interesting values at header fields, truncation,
    reordered, duplicated, dropped and moved packets, splices, oversized data, connection
    order): no invariant violation; the outcomes are a real mix."""
    counts: collections.Counter[str] = collections.Counter()
    for index, case in enumerate(fh.cases(seeds, 2024, 0, CI_CASES)):
        cfg = fh.Config(trace_memory=index % CI_TRACE_EVERY == 0, max_reads=CI_MAX_READS)
        res = fh.run_case(case, cfg)
        assert_ok(res, case)
        counts[res.outcome] += 1
    print(f"\nfuzz outcomes over {CI_CASES} cases: {dict(counts.most_common())}")
    assert counts["completed-correct"] >= CI_CASES // 10
    errors = {k for k in counts if k != "completed-correct"}
    assert len(errors) >= 12, counts
    assert {"ChannelClosed", "MainStreamError", "DecompressionError", "BadOffset"} <= errors


# --- hypothesis: generated headers and records ------------------------------------------------

SLOW = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

u32 = st.one_of(st.sampled_from(fh.U32), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(fh.U64), st.integers(0, 2**64 - 1))
names = st.one_of(
    st.sampled_from(["pc.ram", "pc.bios", "ram", "", "pc.ram\0x", "x" * 255]),
    st.text(min_size=0, max_size=8),
)


@st.composite
def packet_headers(draw: st.DrawFn) -> bytes:
    """A packet header with every field drawn (valid ones often, hostile ones too)."""
    seed_blocks = {"pc.ram": 96 * PS}
    normal = draw(st.one_of(st.integers(0, 4), st.sampled_from([127, 128, 129]), u32))
    alloc = draw(st.one_of(st.just(128), u32))
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 6, 8, 0x10]), u32))
    name = draw(names)
    noffsets = min(normal, 128) if normal <= 2**16 else 4
    offsets = draw(
        st.lists(
            st.one_of(st.integers(0, seed_blocks["pc.ram"] // PS - 1).map(lambda p: p * PS), u64),
            min_size=noffsets,
            max_size=noffsets,
        )
    )
    size = draw(st.one_of(st.just(min(normal, 2**20) * PS % 2**32), u32))
    num = draw(u64)
    buf = bytearray(fh.HEADER)
    struct.pack_into(">IIIIIIQ", buf, 0, 0x11223344, 1, flags, alloc, normal, size, num)
    raw = name.encode("utf-8", "surrogatepass")[:256]
    buf[64 : 64 + len(raw)] = raw
    for i, off in enumerate(offsets[:128]):
        struct.pack_into(">Q", buf, 320 + 8 * i, off)
    return bytes(buf)


@SLOW
@given(
    header=packet_headers(),
    payload=st.one_of(st.just(b""), st.binary(max_size=64), st.sampled_from([b"\xab" * PS])),
    where=st.integers(0, 40),
    channel=st.integers(0, 1),
    chunk_seed=st.integers(0, 2**32 - 1),
)
def test_generated_packet_headers(
    header: bytes, payload: bytes, where: int, channel: int, chunk_seed: int
) -> None:
    """A generated packet (and payload) inserted at a packet boundary of a valid stream."""
    seed = _seed("ours-none-1ch") if channel == 0 else _seed("ours-zstd-2ch-2r")
    conns = [bytearray(c) for c in seed.conns]
    target = conns[1 + channel % seed.channels]
    packets = fh.split_channel(bytes(target))
    at = packets[where % len(packets)].start if packets else len(target)
    target[at:at] = header + payload
    case = fh.Case(seed.name, seed.method, seed.channels, seed.blocks, [bytes(c) for c in conns],
                   [f"generated packet at {at}"], chunk_seed, "memory", False)  # fmt: skip
    assert_ok(fh.run_case(case, fh.Config(trace_memory=False, max_reads=CI_MAX_READS)), case)


zero_record = st.tuples(
    st.one_of(st.integers(0, 95).map(lambda p: p * PS), u64),  # offset
    st.sampled_from([0x02, 0x22, 0x08, 0x28, 0x10, 0x04, 0x40, 0x100, 0x200, 0x01, 0x80, 0x2A]),
    names,
    st.integers(0, 255),  # fill
)


@SLOW
@given(
    records=st.lists(zero_record, min_size=1, max_size=6),
    where=st.integers(0, 2**16),
    chunk_seed=st.integers(0, 2**32 - 1),
    known_zero=st.booleans(),
)
def test_generated_main_records(
    records: list[tuple[int, int, str, int]], where: int, chunk_seed: int, known_zero: bool
) -> None:
    """Generated RAM records (zero, page, EOS, unknown flags; any offset, block, fill) inserted
    into the main stream just before one of its EOS records."""
    seed = _seed("ours-none-1ch")
    main = bytearray(seed.conns[0])
    eos = [i for i in range(len(main) - 8) if main[i : i + 8] == (0x10).to_bytes(8, "big")]
    at = eos[where % len(eos)]
    blob = bytearray()
    for offset, flags, name, fill in records:
        blob += (((offset & ~0xFFF) | flags) % 2**64).to_bytes(8, "big")
        if not flags & 0x20:
            raw = name.encode("utf-8", "surrogatepass")[:255]
            blob += bytes((len(raw),)) + raw
        blob += bytes((fill,)) * (PS if flags & 0x08 else 1)
    main[at:at] = blob
    conns = [bytes(main), *seed.conns[1:]]
    case = fh.Case(seed.name, seed.method, seed.channels, seed.blocks, conns,
                   [f"generated records at {at}"], chunk_seed, "memory", known_zero)  # fmt: skip
    assert_ok(fh.run_case(case, fh.Config(trace_memory=False, max_reads=CI_MAX_READS)), case)


@SLOW
@given(
    syncs=st.lists(st.integers(0, 3), min_size=2, max_size=2),
    pages=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 95), st.integers(0, 255)), max_size=6
    ),
    chunk_seed=st.integers(0, 2**32 - 1),
)
def test_generated_sync_structure(
    syncs: list[int], pages: list[tuple[int, int, int]], chunk_seed: int
) -> None:
    """Extra SYNC packets and extra page packets appended to valid channels: the model decides
    whether the destination must complete, must fail, or may do either."""
    seed = _seed("ours-none-2ch-3r")
    conns = [bytearray(c) for c in seed.conns]
    for ch, count in enumerate(syncs):
        for _ in range(count):
            conns[1 + ch] += MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, 7).encode(128)
    for ch, page, fill in pages:
        pkt = MultiFDPacket(0, 128, 1, PS, 9, "ram", [page * PS]).encode(128)
        conns[1 + ch] += pkt + bytes((fill,)) * PS
    case = fh.Case(seed.name, seed.method, seed.channels, seed.blocks, [bytes(c) for c in conns],
                   ["generated syncs"], chunk_seed, "memory", False)  # fmt: skip
    assert_ok(fh.run_case(case, fh.Config(trace_memory=False, max_reads=CI_MAX_READS)), case)


_SEED_CACHE: dict[str, fh.Seed] = {}


@pytest.fixture(scope="module", autouse=True)
def _seeds_by_name(seeds: list[fh.Seed]) -> None:
    """Fill the cache before any test runs: our seeds are recorded as a Hypothesis example of
    their own (``fh.deterministic``), which cannot run inside another test's example."""
    _SEED_CACHE.update((s.name, s) for s in seeds)


def _seed(prefix: str) -> fh.Seed:
    """Seeds for the hypothesis tests (given functions cannot take module fixtures)."""
    return next(s for name, s in _SEED_CACHE.items() if name.startswith(prefix))


# --- regressions: bugs the fuzzer found, reduced ----------------------------------------------


async def test_zero_record_during_a_payload_does_not_hide_later_zero_records() -> None:
    """Found by fuzz/run.py (seed 1, case 1789: a main stream spliced from another seed).

    The destination marked a packet's pages as written (``known_zero`` tracking) before their
    payload arrived; a zero record for the same page on the main channel, landing meanwhile,
    cleared the mark while the data still came in, so the last round's zero record for that
    page was skipped and the page kept stale data. Reduced: a page sent on channel 0 in round 1
    whose payload arrives after a round-1 zero record for it, then zeroed again in the last round.
    """
    net = MemoryNetwork()
    memory = bytearray(4 * PS)
    block = RAMBlock("ram", memory, PS, known_zero=True)
    sync = MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, 0).encode(128)
    page = MultiFDPacket(0, 128, 1, PS, 1, "ram", [0]).encode(128)

    async def source() -> None:
        w = MainStreamWriter()
        main = await net.connect()
        chan = await net.connect()
        await chan.send_all(MultiFDInit(0).encode() + sync)
        w.header()
        w.ram_setup([("ram", 4 * PS)])
        w.eos()
        w.section_part()
        await main.send_all(w.take())
        await chan.send_all(page)  # header only: the channel waits for the payload
        await trio.testing.wait_all_tasks_blocked()
        w.zero_page("ram", 0)  # same round, same page: the race
        await main.send_all(w.take())
        await trio.testing.wait_all_tasks_blocked()
        await chan.send_all(b"\xee" * PS + sync + sync)
        w.eos()
        w.section_end()
        w.zero_page("ram", 0)  # the last word on page 0: zero
        w.eos()
        w.eof()
        await main.send_all(w.take())
        await main.aclose()
        await chan.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            async with open_destination(net.accept, channels=1, blocks=[block]) as dst:
                await dst.wait()
    assert memory[:PS] == bytes(PS)
