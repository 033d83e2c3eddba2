"""The mutator: byte-level, structure-aware (multifd packets, main stream records) and
connection-level mutations of a case's connections, each saying what it did."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from multifd_core.wire import MULTIFD_FLAG_SYNC, MULTIFD_INIT_SIZE, MULTIFD_MAGIC_BYTES

from .recordings import HEADER, PS
from .seeds import Seed

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

    def packets_of(self, conns: list[bytearray]) -> tuple[int, bytearray, list[Packet]]:
        """A multifd connection (if any), its bytes and the packets they parse into."""
        i = self.pick(conns, multifd=True)
        return i, conns[i], split_channel(bytes(conns[i]))

    def packet_field(self, conns: list[bytearray]) -> str:
        i, c, packets = self.packets_of(conns)
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
        i, c, packets = self.packets_of(conns)
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
