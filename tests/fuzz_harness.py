"""The destination fuzzer: seeds, mutations, a reference model, and one case run with its checks.

Shared by ``tests/test_fuzz.py`` (a few thousand cases in CI) and ``fuzz/run.py`` (the long run).

A *case* is a list of connections (the bytes each one delivers, main channel and multifd channels
in some accept order) made from a valid *seed* stream by zero or more mutations. The destination
(``open_destination``) receives them through replayed memory streams or real socketpairs, in chunks
of random sizes, each connection ending with EOF; it writes into blocks that are views into larger
buffers with canary bytes before and after. Every case must end, well within ``Config.bound``,
either completed with the right memory or with a ``MultiFDError``; the guards must be intact and
the traced memory peak below :func:`memory_bound`.

"The right memory" comes from :func:`model`, an independent reading of the same bytes (using the
sans-I/O codecs and the method's receive contexts, no I/O): which connections are what, which
pages each round writes, and which orders of writes the destination's SYNC barrier leaves open.
It also says whether the input is valid (the destination must complete), invalid (it must fail)
or racy (either is right; e.g. pages before a channel's first SYNC, which may arrive before the
main channel announced the blocks).
"""

from __future__ import annotations

import inspect
import json
import lzma
import random
import struct
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from multifd_core import MultiFDMethod, RAMBlock, load_methods, open_destination, open_source
from multifd_core import mainstream as ms
from multifd_core.errors import MultiFDError
from multifd_core.wire import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC_BYTES,
    PacketRules,
    decode_init,
    decode_packet,
    pages_per_packet,
)

PS = 4096
HEADER = 1344
GUARD = 4096
GUARD_BYTE = 0x5A
INITIAL_BYTE = 0xA5  # what a destination block holds before the migration (unless known_zero)
QEVM = b"QEVM"
DATA_DIR = Path(__file__).resolve().parent / "data"
REC_MAGIC = b"MFDREC1\n"

_DESTINATION_PARAMS = inspect.signature(open_destination).parameters


# --- recordings -------------------------------------------------------------------------------


def save_recording(path: Path, conns: Sequence[bytes], meta: dict[str, Any]) -> None:
    """lzma(``MFDREC1\\n`` + one JSON line {meta, lengths} + the connections' bytes)."""
    head = json.dumps({**meta, "lengths": [len(c) for c in conns]}).encode() + b"\n"
    path.write_bytes(lzma.compress(REC_MAGIC + head + b"".join(conns), preset=9))


def load_recording(path: Path) -> tuple[list[bytes], dict[str, Any]]:
    raw = lzma.decompress(path.read_bytes())
    if not raw.startswith(REC_MAGIC):
        raise ValueError(f"{path} is not a recording")
    nl = raw.index(b"\n", len(REC_MAGIC))
    meta = json.loads(raw[len(REC_MAGIC) : nl])
    pos = nl + 1
    conns = []
    for n in meta["lengths"]:
        conns.append(raw[pos : pos + n])
        pos += n
    return conns, meta


# --- seeds ------------------------------------------------------------------------------------


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

    # The same seeds in every process, so that a case is reproduced from its run seed and index
    # alone: worker-thread jobs (compression, zero scans) run inline, and trio's scheduler, which
    # reverses its run batches at random, runs from a fixed state.
    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    rng = trio._core._run._r
    state = rng.getstate()
    threaded = trio.to_thread.run_sync
    rng.seed(0)
    trio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        return trio.run(make)
    finally:
        trio.to_thread.run_sync = threaded
        rng.setstate(state)


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


# --- the reference model ----------------------------------------------------------------------


_REGISTRY = None


def method_named(name: str) -> MultiFDMethod:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_methods()
    return _REGISTRY.create(name)


@dataclass
class Verdict:
    """What the destination must do with a case.

    ``status``: "valid" (must complete with ``final`` memory), "invalid" (must fail), or "racy"
    (either; if it completes, the memory must still agree with ``final``). ``final`` maps
    (block, offset) to the page contents the SYNC barrier allows there (empty: any, where two
    sources write the page differently in its last round).
    """

    status: str
    reason: str = ""
    blocks: tuple[tuple[str, int], ...] = ()
    final: dict[tuple[str, int], set[bytes]] = field(default_factory=dict)


class _Invalid(Exception):
    pass


_Writes = dict[tuple[str, int], tuple[int, dict[str, bytes]]]


def _note(writes: _Writes, key: tuple[str, int], rnd: int, source: str, data: bytes) -> None:
    """Keep, per page, the latest round that writes it and each source's last write there."""
    have = writes.get(key)
    if have is None or rnd > have[0]:
        writes[key] = (rnd, {source: data})
    elif rnd == have[0]:
        have[1][source] = data


def model(
    conns: Sequence[bytes],
    method: str,
    channels: int,
    given: Sequence[tuple[str, int]] | None,
    *,
    max_device_state: int | None = 1 << 20,
) -> Verdict:
    """Decide what the destination must make of ``conns`` (see :class:`Verdict`)."""
    racy: list[str] = []
    try:
        return _model(conns, method, channels, given, max_device_state, racy)
    except _Invalid as exc:
        return Verdict("invalid", str(exc))
    except MultiFDError as exc:
        return Verdict("invalid", f"{type(exc).__name__}: {exc}")


def _model(
    conns: Sequence[bytes],
    method_name: str,
    channels: int,
    given: Sequence[tuple[str, int]] | None,
    max_device_state: int | None,
    racy: list[str],
) -> Verdict:
    mains = [c for c in conns if c[:4] == QEVM]
    chans = [c for c in conns if c[:4] == MULTIFD_MAGIC_BYTES]
    if len(mains) + len(chans) != len(conns):
        raise _Invalid("a connection that is neither main nor multifd")
    if len(conns) != channels + 1:
        raise _Invalid(f"{len(conns)} connections for {channels} channels")
    if len(mains) != 1:
        raise _Invalid(f"{len(mains)} main channels")
    by_id: dict[int, bytes] = {}
    uuids = set()
    for c in chans:
        if len(c) < MULTIFD_INIT_SIZE:
            raise _Invalid("short init packet")
        init = decode_init(c[:MULTIFD_INIT_SIZE], num_channels=channels)
        if init.id in by_id:
            raise _Invalid("duplicate channel id")
        by_id[init.id] = c
        uuids.add(init.uuid)
    if len(uuids) > 1:
        raise _Invalid("channels disagree on the uuid")

    writes: _Writes = {}
    # the main stream
    parser = ms.MainStreamParser(page_size=PS, max_device_state=max_device_state)
    parser.feed(mains[0])
    parser.feed_eof()
    blocks: tuple[tuple[str, int], ...] = ()
    rounds = 0
    while True:
        ev = parser.next_event()
        if ev is ms.NEED_DATA:
            raise AssertionError("the parser needs data after EOF")
        if isinstance(ev, ms.ConnectionEnd):
            break
        if isinstance(ev, ms.RamBlocks):
            blocks = ev.blocks
            if given is not None:
                sizes = dict(given)
                for name, size in blocks:
                    if sizes.get(name) != size:
                        raise _Invalid(f"block {name!r} of {size} bytes does not match")
        elif isinstance(ev, ms.ZeroPage):
            _note(writes, (ev.block, ev.offset), rounds, "main", bytes((ev.fill,)) * PS)
        elif isinstance(ev, ms.Page):
            _note(writes, (ev.block, ev.offset), rounds, "main", bytes(ev.data))
        elif isinstance(ev, ms.RoundEnd):
            rounds += 1

    # the channels
    method = method_named(method_name)
    rules = PacketRules(
        page_size=PS,
        max_pages=pages_per_packet(PS),
        compression=method.value,
        payload_size=method.payload_size,
    )
    sizes = dict(blocks)
    for cid, data in by_id.items():
        ctx = method.recv_setup(cid)
        try:
            _model_channel(cid, data, rules, sizes, method, ctx, rounds, writes, racy)
        finally:
            ctx.recv_cleanup()

    # Two sources writing one page differently in the same round race byte by byte (a packet's
    # payload lands in pieces while the main channel may fill the page): any content is right.
    final = {}
    for key, (_, by_source) in writes.items():
        values = set(by_source.values())
        final[key] = values if len(values) == 1 else set()
    status = "racy" if racy else "valid"
    return Verdict(status, "; ".join(racy), blocks, final)


def _model_channel(
    cid: int,
    data: bytes,
    rules: PacketRules,
    sizes: dict[str, int],
    method: MultiFDMethod,
    ctx: Any,
    rounds: int,
    writes: _Writes,
    racy: list[str],
) -> None:
    pos = MULTIFD_INIT_SIZE
    syncs = 0
    source = f"ch{cid}"
    view = memoryview(data)
    while pos < len(data):
        if len(data) - pos < HEADER:
            raise _Invalid(f"channel {cid}: short header")
        packet = decode_packet(view[pos : pos + HEADER], rules, sizes)
        pos += HEADER
        if packet.normal_pages:
            if syncs > rounds:
                raise _Invalid(f"channel {cid}: pages after the last round")
            if syncs == rounds:
                racy.append(f"channel {cid}: pages after its last needed SYNC")
            if syncs == 0:
                racy.append(f"channel {cid}: pages before its first SYNC")
            n = packet.next_packet_size
            if len(data) - pos < n:
                raise _Invalid(f"channel {cid}: short payload")
            payload = view[pos : pos + n]
            pos += n
            raw = packet.normal_pages * PS
            if method.raw_payload:
                pages = bytes(payload)
            else:
                out = bytearray(raw)
                ctx.recv_pages(payload, [memoryview(out)])
                pages = bytes(out)
            for i, off in enumerate(packet.normal_offsets):
                _note(writes, (packet.ramblock, off), syncs, source, pages[i * PS : i * PS + PS])
        if packet.sync:
            syncs += 1
    if syncs < rounds:
        raise _Invalid(f"channel {cid}: {syncs} SYNCs for {rounds} rounds")


# --- mutations --------------------------------------------------------------------------------

U8 = (0, 1, 0x7F, 0x80, 0xFE, 0xFF)
U32 = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 127, 128, 129, 255, 256, 4095, 4096, 4097,
       0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0x11223344, 0x5145564D)  # fmt: skip
U64 = (0, 1, 0x02, 0x10, 0x22, 0x04, 0x08, 0x28, 0x40, 0x100, 0x200, 4096, 0x1002, 0x1022,
       1 << 20, (1 << 20) - PS, 1 << 24, 1 << 32, 1 << 40, 1 << 63, (1 << 64) - 1,
       (1 << 64) - PS, (1 << 64) - PS + 0x22)  # fmt: skip
PACKET_FIELDS = (  # name, offset, width
    ("magic", 0, 4),
    ("version", 4, 4),
    ("flags", 8, 4),
    ("pages_alloc", 12, 4),
    ("normal_pages", 16, 4),
    ("next_packet_size", 20, 4),
    ("packet_num", 24, 8),
    ("zero_pages", 32, 4),
)


@dataclass
class Packet:
    start: int
    end: int
    normal: int
    sync: bool


def split_channel(data: bytes) -> list[Packet]:
    """The packets of a multifd channel's bytes, as far as they parse (after the init)."""
    out = []
    pos = MULTIFD_INIT_SIZE
    while len(data) - pos >= HEADER:
        flags, _alloc, normal, size = struct.unpack_from(">IIII", data, pos + 8)
        end = pos + HEADER + (size if normal else 0)
        if end > len(data) or size > 1 << 21:
            break
        out.append(Packet(pos, end, normal, bool(flags & MULTIFD_FLAG_SYNC)))
        pos = end
    return out


def interesting(rng: random.Random, width: int, extra: Sequence[int] = ()) -> int:
    pool = {1: U8, 2: (0, 1, 0x7FFF, 0x8000, 0xFFFF), 4: U32, 8: U64}[width]
    choices = list(pool) + list(extra)
    value = rng.choice(choices)
    if rng.random() < 0.2:
        value += rng.choice((-1, 1, PS, -PS))
    return value % (1 << (8 * width))


def put(buf: bytearray, pos: int, width: int, value: int) -> None:
    if pos + width <= len(buf):
        buf[pos : pos + width] = value.to_bytes(width, "big")


class Mutator:
    """Applies random mutations to a case's connections; each one says what it did."""

    def __init__(self, rng: random.Random, seed: Seed, pool: Sequence[Seed]) -> None:
        self.rng = rng
        self.seed = seed
        self.pool = pool
        self.sizes = [s for _, s in seed.blocks]
        self.names = [n for n, _ in seed.blocks]

    def pick(self, conns: list[bytearray], multifd: bool | None = None) -> int:
        idx = [
            i
            for i, c in enumerate(conns)
            if multifd is None or (c[:4] == MULTIFD_MAGIC_BYTES) == multifd
        ]
        return self.rng.choice(idx or list(range(len(conns))))

    def position(self, c: bytearray) -> int:
        r = self.rng.random()
        if r < 0.15:
            return self.rng.randrange(min(len(c), 80) or 1)
        return self.rng.randrange(len(c) or 1)

    # byte-level

    def flip(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        if not c:
            return "flip: empty"
        done = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 4, 8))):
            pos = self.position(c)
            bit = self.rng.randrange(8)
            c[pos] ^= 1 << bit
            done.append(f"{pos}.{bit}")
        return f"flip conn {i} bits {','.join(done)}"

    def set_byte(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        if not c:
            return "set_byte: empty"
        pos = self.position(c)
        c[pos] = self.rng.choice(U8) if self.rng.random() < 0.5 else self.rng.randrange(256)
        return f"set conn {i} byte {pos} = {c[pos]:#x}"

    def set_int(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        width = self.rng.choice((2, 4, 8))
        pos = self.position(c)
        value = interesting(self.rng, width, self.sizes)
        put(c, pos, width, value)
        return f"set conn {i} be{width * 8} at {pos} = {value:#x}"

    def truncate(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        cut = self.rng.randrange(len(c) + 1)
        if c[:4] == MULTIFD_MAGIC_BYTES and self.rng.random() < 0.5:
            packets = split_channel(bytes(c))
            if packets:
                p = self.rng.choice(packets)
                cut = self.rng.choice((p.start, p.start + 1, p.start + HEADER - 1, p.end - 1))
        del c[cut:]
        return f"truncate conn {i} at {cut}"

    def delete(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        pos = self.position(c)
        n = self.rng.choice((1, 2, 4, 8, self.rng.randrange(1, 5000)))
        del c[pos : pos + n]
        return f"delete conn {i} [{pos}:+{n}]"

    def insert(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        pos = self.position(c)
        n = self.rng.choice((1, 4, 8, self.rng.randrange(1, 5000)))
        what = self.rng.randbytes(n) if self.rng.random() < 0.5 else bytes(n)
        c[pos:pos] = what
        return f"insert conn {i} at {pos} {n} bytes"

    def dup_range(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        pos = self.position(c)
        n = self.rng.randrange(1, 20000)
        c[pos:pos] = c[pos : pos + n]
        return f"duplicate conn {i} [{pos}:+{n}]"

    def splice(self, conns: list[bytearray]) -> str:
        """Replace the tail of a connection with the tail of a same-kind one from another seed."""
        i = self.pick(conns)
        c = conns[i]
        other = self.rng.choice(self.pool)
        same = [o for o in other.conns if o[:4] == bytes(c[:4])] or other.conns
        donor = self.rng.choice(same)
        a = self.position(c)
        b = self.rng.randrange(len(donor) + 1)
        if self.rng.random() < 0.5:  # aligned: same offset in both
            b = min(a, len(donor))
        c[a:] = donor[b:]
        return f"splice conn {i} from {a} with {other.name} from {b}"

    def oversize(self, conns: list[bytearray]) -> str:
        i = self.pick(conns)
        c = conns[i]
        n = self.rng.choice((64 << 10, 1 << 20, 3 << 20))
        pos = len(c) if self.rng.random() < 0.5 else self.position(c)
        kind = self.rng.randrange(3)
        if kind == 0:
            blob = self.rng.randbytes(n)
        elif kind == 1:
            blob = bytes(n)
        else:  # many copies of a real packet (or of the main stream's tail)
            packets = split_channel(bytes(c)) if c[:4] == MULTIFD_MAGIC_BYTES else []
            if packets:
                p = self.rng.choice(packets)
                unit = bytes(c[p.start : p.end])
            else:
                unit = bytes(c[-9:]) or b"\0"
            blob = unit * max(1, n // len(unit))
        c[pos:pos] = blob
        return f"oversize conn {i} at {pos}: {len(blob)} bytes kind {kind}"

    # structure-aware: multifd packets

    def packet_field(self, conns: list[bytearray]) -> str:
        i = self.pick(conns, multifd=True)
        c = conns[i]
        packets = split_channel(bytes(c))
        if not packets:
            return self.set_int(conns)
        p = self.rng.choice(packets)
        r = self.rng.random()
        if r < 0.55:
            name, off, width = self.rng.choice(PACKET_FIELDS)
            value = interesting(self.rng, width, (p.normal, p.normal * PS, p.end - p.start))
            if name == "flags" and self.rng.random() < 0.5:
                value = int.from_bytes(c[p.start + 8 : p.start + 12], "big") ^ (
                    1 << self.rng.randrange(5)
                )
            put(c, p.start + off, width, value)
            return f"conn {i} packet at {p.start}: {name} = {value:#x}"
        if r < 0.8:
            k = self.rng.randrange(max(1, min(p.normal + 1, 128)))
            value = self.rng.choice(
                [*self.sizes, *(s - PS for s in self.sizes), 0, PS, 0x800, 1 << 63, (1 << 64) - PS]
            )
            put(c, p.start + 320 + 8 * k, 8, value)
            return f"conn {i} packet at {p.start}: offset[{k}] = {value:#x}"
        name = self.rng.choice([*self.names, "", "x" * 255, "pc.ram\0junk", "\xff"])
        raw = name.encode("utf-8", "surrogateescape")[:256].ljust(256, b"\0")
        c[p.start + 64 : p.start + 320] = raw
        return f"conn {i} packet at {p.start}: ramblock = {name[:20]!r}"

    def packet_shuffle(self, conns: list[bytearray]) -> str:
        """Swap, duplicate, drop or move whole packets."""
        i = self.pick(conns, multifd=True)
        c = conns[i]
        packets = split_channel(bytes(c))
        if not packets:
            return self.truncate(conns)
        p = self.rng.choice(packets)
        unit = bytes(c[p.start : p.end])
        op = self.rng.randrange(4)
        if op == 0:
            q = self.rng.choice(packets)
            a, b = sorted((p, q), key=lambda x: x.start)
            if a.start == b.start:
                return "swap: same packet"
            c[a.start : b.end] = c[b.start : b.end] + c[a.end : b.start] + c[a.start : a.end]
            return f"conn {i}: swap packets at {a.start} and {b.start}"
        if op == 1:
            times = self.rng.choice((1, 1, 2, 50))
            c[p.end : p.end] = unit * times
            return f"conn {i}: duplicate packet at {p.start} x{times}"
        if op == 2:
            del c[p.start : p.end]
            return f"conn {i}: drop packet at {p.start}"
        j = self.pick(conns, multifd=True)
        other = conns[j]
        del c[p.start : p.end]
        targets = split_channel(bytes(other))
        at = self.rng.choice(targets).start if targets else len(other)
        other[at:at] = unit
        return f"move packet at {p.start} of conn {i} to conn {j} at {at}"

    def init_field(self, conns: list[bytearray]) -> str:
        i = self.pick(conns, multifd=True)
        c = conns[i]
        r = self.rng.randrange(4)
        if r == 0:
            value = self.rng.choice((0, 1, 2, 3, 255))
            put(c, 24, 1, value)
            return f"conn {i}: init id = {value}"
        if r == 1:
            put(c, 8 + self.rng.randrange(16), 1, self.rng.randrange(256))
            return f"conn {i}: init uuid byte"
        if r == 2:
            put(c, 4, 4, interesting(self.rng, 4))
            return f"conn {i}: init version"
        put(c, 25 + self.rng.randrange(39), 1, self.rng.randrange(256))
        return f"conn {i}: init reserved byte"

    # structure-aware: the main stream

    def main_record(self, conns: list[bytearray]) -> str:
        i = self.pick(conns, multifd=False)
        c = conns[i]
        starts = [
            p
            for p in range(0, max(0, len(c) - 8))
            if c[p + 7] in (0x02, 0x22, 0x10, 0x04, 0x08, 0x28) and not c[p + 6] & 0x0F
        ]
        if not starts:
            return self.set_int(conns)
        pos = self.rng.choice(starts)
        r = self.rng.random()
        if r < 0.5:
            value = interesting(self.rng, 8, [s | f for s in self.sizes for f in (0x02, 0x22)])
            put(c, pos, 8, value)
            return f"main conn {i}: be64 at {pos} = {value:#x}"
        if r < 0.7:
            c[pos + 7] = self.rng.choice((0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x22, 0x40, 0x80))
            return f"main conn {i}: flags at {pos} = {c[pos + 7]:#x}"
        if r < 0.85:
            put(c, pos + 8, 1, self.rng.choice((0, 1, 3, 6, 7, 255)))
            return f"main conn {i}: name length / fill at {pos + 8}"
        c[pos:pos] = c[pos : pos + 9] * self.rng.choice((1, 2, 1000))
        return f"main conn {i}: repeat record at {pos}"

    # connection-level

    def connections(self, conns: list[bytearray]) -> str:
        r = self.rng.random()
        if r < 0.45:
            self.rng.shuffle(conns)
            return "shuffle accept order"
        if r < 0.6:
            i = self.pick(conns)
            conns.insert(self.rng.randrange(len(conns) + 1), bytearray(conns[i]))
            return f"duplicate conn {i}"
        if r < 0.7:
            i = self.pick(conns)
            conns.append(bytearray(self.rng.choice((b"", b"QEVM", b"\x11\x22\x33", b"GET /"))))
            return f"extra short conn after {i}"
        if r < 0.85:
            chans = [i for i, c in enumerate(conns) if c[:4] == MULTIFD_MAGIC_BYTES]
            if len(chans) >= 2:
                a, b = self.rng.sample(chans, 2)
                conns[a][24], conns[b][24] = conns[b][24], conns[a][24]
                return f"swap init ids of conns {a} and {b}"
            return "swap ids: one channel"
        if r < 0.93:
            i = self.pick(conns, multifd=True)
            conns[i][:] = b""
            return f"empty conn {i}"
        # a missing connection costs a connect timeout: rare
        i = self.pick(conns)
        del conns[i]
        return f"drop conn {i}"

    def mutate(self, conns: list[bytearray]) -> str:
        ops: list[tuple[Callable[[list[bytearray]], str], float]] = [
            (self.flip, 14),
            (self.set_byte, 6),
            (self.set_int, 6),
            (self.packet_field, 16),
            (self.main_record, 10),
            (self.packet_shuffle, 10),
            (self.init_field, 3),
            (self.truncate, 8),
            (self.delete, 4),
            (self.insert, 4),
            (self.dup_range, 3),
            (self.splice, 5),
            (self.oversize, 2),
            (self.connections, 3),
        ]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        return op(conns)


# --- cases ------------------------------------------------------------------------------------


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


# --- delivery ---------------------------------------------------------------------------------


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


# --- one case ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The destination's own timeouts (each case must end by itself well before ``bound``)."""

    connect_timeout: float = 0.5
    handshake_timeout: float = 0.5
    drain_timeout: float = 0.5
    idle_timeout: float = 0.5
    bound: float = 10.0
    max_device_state: int = 1 << 20
    trace_memory: bool = True
    #: Bytes of a connection are delivered in about this many chunks at most.
    max_reads: int = 400


@dataclass
class Result:
    outcome: str  # "completed-correct", an error class name, or "VIOLATION:<kind>"
    detail: str
    seconds: float
    peak: int
    verdict: str

    @property
    def violation(self) -> bool:
        return self.outcome.startswith("VIOLATION")


def memory_bound(case: Case, cfg: Config) -> int:
    """The most the destination may allocate (traced) for one case.

    Per channel: its header (1344) and payload buffer (a compressed packet's largest size,
    ~530 KiB), a read-ahead buffer (256 KiB) and one decompressed packet (512 KiB). The main
    channel: its unparsed input, twice over (the parser's buffer compacts at half), and the device
    state it keeps, at most ``max_device_state``. Plus 4 MiB for trio, the stats and the error.
    """
    per_channel = 2 << 20
    main = max((len(c) for c in case.conns if c[:4] == QEVM), default=0)
    return (len(case.conns) + 1) * per_channel + 2 * main + cfg.max_device_state + (4 << 20)


def _options(case: Case, cfg: Config, blocks: list[RAMBlock]) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        channels=case.channels,
        method=method_named(case.method),  # an instance: no plugin loading per case
        blocks=blocks,
        connect_timeout=cfg.connect_timeout,
        handshake_timeout=cfg.handshake_timeout,
        drain_timeout=cfg.drain_timeout,
        max_device_state=cfg.max_device_state,
    )
    if "idle_timeout" in _DESTINATION_PARAMS:
        opts["idle_timeout"] = cfg.idle_timeout
    return opts


async def _destination(
    case: Case, cfg: Config, blocks: list[RAMBlock]
) -> tuple[str, BaseException | None]:
    rng = random.Random(case.chunk_seed)
    send, recv = trio.open_memory_channel[trio.abc.Stream](len(case.conns) + 1)
    feeders: list[tuple[trio.SocketStream, bytes, random.Random]] = []
    for data in case.conns:
        crng = random.Random(rng.getrandbits(32))
        if case.transport == "socket":
            a, b = trio.socket.socketpair()
            near, far = trio.SocketStream(a), trio.SocketStream(b)
            feeders.append((near, data, crng))
            send.send_nowait(far)
        else:
            send.send_nowait(ReplayStream(data, crng, cfg.max_reads))

    async def accept() -> trio.abc.Stream:
        return await recv.receive()  # no more connections: waits, as a quiet listener does

    try:
        async with trio.open_nursery() as nursery:
            for near, data, crng in feeders:
                nursery.start_soon(feed_socket, near, data, crng, cfg.max_reads)
            try:
                async with open_destination(accept, **_options(case, cfg, blocks)) as dst:
                    await dst.wait()
                return "completed", None
            except MultiFDError as exc:
                return type(exc).__name__, exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # connections never accepted (the destination failed first)
        while True:
            try:
                stream = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            await stream.aclose()
        for near, _, _ in feeders:
            await near.aclose()


def _guarded(case: Case) -> tuple[list[RAMBlock], list[bytearray], list[bytes]]:
    blocks, backings, initial = [], [], []
    for name, size in case.blocks:
        fill = 0 if case.known_zero else INITIAL_BYTE
        backing = bytearray(
            bytes((GUARD_BYTE,)) * GUARD + bytes((fill,)) * size + bytes((GUARD_BYTE,)) * GUARD
        )
        view = memoryview(backing)[GUARD : GUARD + size]
        blocks.append(RAMBlock(name, view, PS, known_zero=case.known_zero))
        backings.append(backing)
        initial.append(bytes((fill,)) * size)
    return blocks, backings, initial


def run_case(case: Case, cfg: Config = Config()) -> Result:
    """Run one case in a fresh trio run; check every invariant."""
    verdict = model(case.conns, case.method, case.channels, case.blocks,
                    max_device_state=cfg.max_device_state)  # fmt: skip
    blocks, backings, initial = _guarded(case)
    started = time.perf_counter()
    outcome: str
    exc: BaseException | None = None
    detail = ""
    if cfg.trace_memory:
        tracemalloc.start()
    try:

        async def main() -> tuple[str, BaseException | None]:
            with trio.fail_after(cfg.bound):
                return await _destination(case, cfg, blocks)

        outcome, exc = trio.run(main)
    except trio.TooSlowError:
        outcome = "VIOLATION:hang"
        detail = f"no end within {cfg.bound} s"
    except BaseException as raised:
        if isinstance(raised, KeyboardInterrupt):
            raise
        outcome = "VIOLATION:untyped"
        detail = "".join(traceback.format_exception(raised))
    finally:
        peak = tracemalloc.get_traced_memory()[1] if cfg.trace_memory else 0
        if cfg.trace_memory:
            tracemalloc.stop()
    seconds = time.perf_counter() - started
    if exc is not None:
        detail = f"{type(exc).__name__}: {exc}"
    for b in blocks:
        b.host.release()

    def result(out: str, why: str = detail) -> Result:
        return Result(out, why, seconds, peak, f"{verdict.status}: {verdict.reason}"[:300])

    if outcome.startswith("VIOLATION"):
        return result(outcome)
    for (name, size), backing in zip(case.blocks, backings, strict=True):
        if (
            backing[:GUARD].count(GUARD_BYTE) != GUARD
            or backing[GUARD + size :].count(GUARD_BYTE) != GUARD
        ):
            return result("VIOLATION:write-outside-block", f"guard of {name!r} changed; {detail}")
    bound = memory_bound(case, cfg)
    if cfg.trace_memory and peak > bound:
        return result("VIOLATION:memory", f"peak {peak} > bound {bound}; {detail}")
    if outcome == "completed":
        if verdict.status == "invalid":
            return result("VIOLATION:accepted-invalid", verdict.reason)
        wrong = _wrong_pages(case, backings, initial, verdict)
        if wrong:
            return result("VIOLATION:wrong-data", wrong)
        return result("completed-correct", "")
    if verdict.status == "valid":
        return result("VIOLATION:rejected-valid", detail)
    return result(outcome)


def _wrong_pages(
    case: Case, backings: list[bytearray], initial: list[bytes], verdict: Verdict
) -> str:
    """Where the memory differs from the model: a written page must hold one of its allowed
    contents, every other page its initial bytes."""
    by_block: dict[str, list[tuple[int, set[bytes]]]] = {}
    for (bname, off), values in verdict.final.items():
        by_block.setdefault(bname, []).append((off, values))
    for (name, size), backing, init in zip(case.blocks, backings, initial, strict=True):
        got = bytearray(backing[GUARD : GUARD + size])
        for off, values in by_block.get(name, ()):
            if values and bytes(got[off : off + PS]) not in values:
                return (
                    f"block {name!r} page {off:#x} holds none of its {len(values)} allowed values"
                )
            got[off : off + PS] = init[off : off + PS]
        if got != init:
            for off in range(0, size, PS):
                if got[off : off + PS] != init[off : off + PS]:
                    return f"block {name!r} page {off:#x} changed, but nothing was sent for it"
    return ""


def check_seed(seed: Seed, cfg: Config = Config()) -> Result:
    """Replay a seed unchanged: it must complete and equal the source's memory."""
    case = Case(seed.name, seed.method, seed.channels, list(seed.blocks), list(seed.conns), [],
                0, "memory", False)  # fmt: skip
    res = run_case(case, cfg)
    if res.outcome == "completed-correct" and seed.expected is not None:
        verdict = model(seed.conns, seed.method, seed.channels, seed.blocks)
        for name, size in seed.blocks:
            want = bytearray(bytes((INITIAL_BYTE,)) * size)
            for (bname, off), values in verdict.final.items():
                if bname == name:
                    (want[off : off + PS],) = values
            if bytes(want) != seed.expected[name]:
                res.outcome = "VIOLATION:model-disagrees-with-source"
    return res
