"""The multifd codec against WIRE.md: golden bytes built by hand, round-trips, every rule."""

from __future__ import annotations

import struct
import uuid as _uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd_core import errors
from multifd_core.wire import (
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_QATZIP,
    MULTIFD_FLAG_QPL,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_UADK,
    MULTIFD_FLAG_ZLIB,
    MULTIFD_FLAG_ZSTD,
    MultiFDInit,
    MultiFDPacket,
    PacketRules,
    check_page_size,
    compression_flags,
    compression_value,
    decode_init,
    decode_packet,
    encode_block_name,
    packet_header_size,
    pages_per_packet,
    uuid_bytes,
)

PAGE = 4096
UUID = bytes.fromhex("00112233445566778899aabbccddeeff")
BLOCKS = {"pc.ram": 1 << 20, "pc.bios": 256 * 1024, "/rom@etc/acpi/tables": 128 * 1024}
RULES = PacketRules()
HEADER = 1344


def raises_exactly(cls: type[BaseException], match: str | None = None):
    """pytest.raises that also insists on the exact class (not a subclass or base)."""

    class _Exact:
        def __enter__(self):
            self._cm = pytest.raises(cls, match=match)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._cm.__exit__(*exc)
            assert type(self.info.value) is cls, f"{type(self.info.value)!r} is not {cls!r}"
            return handled

    return _Exact()


# --- a hand-made encoder, straight from WIRE.md's tables (independent of wire.py) -----------


def raw_init(chan_id: int, uuid: bytes = bytes(16), magic: int = 0x11223344, version: int = 1):
    return (
        magic.to_bytes(4, "big") + version.to_bytes(4, "big") + uuid + bytes([chan_id]) + bytes(39)
    )


def raw_packet(
    *,
    magic: int = 0x11223344,
    version: int = 1,
    flags: int = 0,
    pages_alloc: int = 128,
    normal_pages: int = 0,
    next_packet_size: int = 0,
    packet_num: int = 0,
    unused: bytes = bytes(32),
    ramblock: bytes = b"",
    offsets: tuple[int, ...] | list[int] = (),
    slots: int = 128,
) -> bytes:
    fixed = struct.pack(
        ">IIIIIIQ", magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num
    )
    assert len(unused) == 32 and len(ramblock) <= 256
    head = fixed + unused + ramblock.ljust(256, b"\0")
    offs = b"".join(o.to_bytes(8, "big") for o in offsets).ljust(8 * slots, b"\0")
    return head + offs


def pages_packet(name: bytes = b"pc.ram", offsets=(0x1000, 0x3000), **kw) -> bytes:
    kw.setdefault("normal_pages", len(offsets))
    kw.setdefault("next_packet_size", kw["normal_pages"] * PAGE)
    return raw_packet(ramblock=name, offsets=offsets, **kw)


# --- golden bytes -------------------------------------------------------------------------


def test_init_golden_bytes():
    golden = bytes.fromhex("11223344") + b"\0\0\0\1" + UUID + b"\x03" + bytes(39)
    assert len(golden) == 64
    assert MultiFDInit(3, UUID).encode() == golden
    assert MultiFDInit(id=3, uuid=UUID) == decode_init(golden, num_channels=4, expected_uuid=UUID)


def test_init_default_uuid_is_all_zero():
    assert MultiFDInit(0).encode() == bytes.fromhex("11223344 00000001") + bytes(56)


def test_init_encode_refuses_id_over_one_byte():
    with raises_exactly(errors.ConfigError, "256"):
        MultiFDInit(256).encode()
    with raises_exactly(errors.ConfigError):
        MultiFDInit(-1).encode()
    assert MultiFDInit(255).encode()[24] == 255


def test_packet_golden_bytes_two_pages():
    golden = (
        bytes.fromhex("11223344")  # magic
        + bytes.fromhex("00000001")  # version
        + bytes.fromhex("00000000")  # flags: nocomp, no sync
        + bytes.fromhex("00000080")  # pages_alloc 128
        + bytes.fromhex("00000002")  # normal_pages
        + bytes.fromhex("00002000")  # next_packet_size = 2 * 4096
        + bytes.fromhex("0000000000000007")  # packet_num
        + bytes(32)  # unused
        + b"pc.ram"
        + bytes(250)  # ramblock[256]
        + bytes.fromhex("0000000000001000")
        + bytes.fromhex("0000000000003000")
        + bytes(126 * 8)  # offset[128]
    )
    assert len(golden) == HEADER
    pkt = MultiFDPacket(
        flags=0,
        pages_alloc=128,
        normal_pages=2,
        next_packet_size=0x2000,
        packet_num=7,
        ramblock="pc.ram",
        offsets=(0x1000, 0x3000),
    )
    wire = pkt.encode()
    assert wire == golden
    # every field at its offset
    assert len(wire) == 1344
    assert wire[0:4] == b"\x11\x22\x33\x44"
    assert wire[4:8] == b"\0\0\0\1"
    assert wire[8:12] == b"\0\0\0\0"
    assert wire[12:16] == b"\0\0\0\x80"
    assert wire[16:20] == b"\0\0\0\x02"
    assert wire[20:24] == b"\0\0\x20\0"
    assert wire[24:32] == b"\0\0\0\0\0\0\0\x07"
    assert wire[32:64] == bytes(32)
    assert wire[64:70] == b"pc.ram" and wire[70:320] == bytes(250)
    assert wire[320:328] == (0x1000).to_bytes(8, "big")
    assert wire[328:336] == (0x3000).to_bytes(8, "big")
    assert wire[336:] == bytes(1008)

    got = decode_packet(golden, RULES, BLOCKS)
    assert got == pkt
    assert got.sync is False and got.compression == 0
    assert list(got.normal_offsets) == [0x1000, 0x3000]
    assert list(got.zero_offsets) == []


@pytest.mark.parametrize(
    ("compression", "sync", "flag_bytes"),
    [
        (0, True, b"\0\0\0\x01"),
        (1, False, b"\0\0\0\x02"),
        (2, False, b"\0\0\0\x04"),
        (2, True, b"\0\0\0\x05"),
        (1, True, b"\0\0\0\x03"),
    ],
)
def test_flag_bits(compression, sync, flag_bytes):
    assert (MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD) == (0x1, 0x2, 0x4)
    flags = compression_flags(compression) | (MULTIFD_FLAG_SYNC if sync else 0)
    pkt = MultiFDPacket(flags, 128, 1, 100, 1, "pc.ram", (0,))
    wire = pkt.encode()
    assert wire[8:12] == flag_bytes
    rules = PacketRules(compression=compression, payload_size=lambda n: (1, n))
    got = decode_packet(wire, rules, BLOCKS)
    assert got.compression == compression == compression_value(int.from_bytes(flag_bytes, "big"))
    assert got.sync is sync


def test_sync_packet_golden():
    golden = bytes.fromhex(
        "11223344 00000001 00000001 00000080 00000000 00000000 00000000000000 2a"
    ) + bytes(HEADER - 32)
    pkt = MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, 42)
    assert pkt.encode() == golden
    got = decode_packet(golden, RULES, BLOCKS)
    assert got == pkt
    assert got.sync and got.normal_pages == 0 and got.ramblock == "" and tuple(got.offsets) == ()


def test_header_is_1344_bytes_even_for_fewer_pages_alloc():
    # pages_alloc < 128 still travels in a 1344-byte header (WIRE.md)
    pkt = MultiFDPacket(0, 16, 1, PAGE, 0, "pc.ram", (0x2000,))
    wire = pkt.encode(128)
    assert len(wire) == HEADER
    assert wire[12:16] == (16).to_bytes(4, "big")
    assert decode_packet(wire, RULES, BLOCKS) == pkt


def test_64k_pages():
    assert pages_per_packet(65536) == 8
    assert packet_header_size(8) == 384
    rules = PacketRules(page_size=65536, max_pages=8)
    assert rules.header_size == 384
    pkt = MultiFDPacket(0, 8, 2, 2 * 65536, 3, "pc.ram", (0, 0x30000))
    wire = pkt.encode()
    assert len(wire) == 384
    assert decode_packet(wire, rules, BLOCKS) == pkt
    # 4 KiB alignment is not enough with 64 KiB pages
    bad = MultiFDPacket(0, 8, 1, 65536, 3, "pc.ram", (0x1000,)).encode()
    with raises_exactly(errors.BadOffset, "aligned"):
        decode_packet(bad, rules, BLOCKS)


def test_page_geometry():
    assert pages_per_packet(4096) == 128
    assert packet_header_size(128) == HEADER
    assert RULES.header_size == HEADER
    assert pages_per_packet(1 << 20) == 1  # pages larger than a packet: one per packet
    for bad in (0, 256, 1000, 4095, 4097):
        with raises_exactly(errors.ConfigError, "power of two"):
            check_page_size(bad)
        with raises_exactly(errors.ConfigError):
            pages_per_packet(bad)


def test_compression_flags_range():
    assert [compression_flags(v) for v in range(8)] == [v << 1 for v in range(8)]
    for bad in (8, -1):
        with raises_exactly(errors.ConfigError, str(bad)):
            compression_flags(bad)
    assert compression_value(0xF) == 7 and compression_value(0x1) == 0


def test_uuid_bytes():
    u = _uuid.UUID(bytes=UUID)
    assert uuid_bytes(None) == bytes(16)
    assert uuid_bytes(u) == UUID
    assert uuid_bytes(str(u)) == UUID
    assert uuid_bytes(UUID) == UUID
    with raises_exactly(errors.ConfigError, "16 bytes"):
        uuid_bytes(UUID[:15])
    with raises_exactly(errors.ConfigError, "bad uuid"):
        uuid_bytes("not-a-uuid")


def test_encode_block_name_limits():
    assert encode_block_name("x" * 255) == b"x" * 255
    for bad in ("", "x" * 256, "a\0b", "é" * 128):
        with raises_exactly(errors.ConfigError, "RAM block name"):
            encode_block_name(bad)


def test_encode_refuses_inconsistent_packets():
    with raises_exactly(errors.ConfigError, "offsets"):
        MultiFDPacket(0, 128, 2, 2 * PAGE, 0, "pc.ram", (0,)).encode()
    with raises_exactly(errors.ConfigError, "offsets"):
        MultiFDPacket(0, 2, 3, 3 * PAGE, 0, "pc.ram", (0, PAGE, 2 * PAGE)).encode()
    with raises_exactly(errors.ConfigError, "zero_pages"):
        MultiFDPacket(0, 128, 1, PAGE, 0, "pc.ram", (0, PAGE), zero_pages=1).encode()


# --- hypothesis round-trips ---------------------------------------------------------------

block_names = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=255,
).filter(lambda s: len(s.encode("utf-8")) <= 255)


@given(chan_id=st.integers(0, 255), uuid=st.binary(min_size=16, max_size=16))
def test_init_roundtrip(chan_id, uuid):
    wire = MultiFDInit(chan_id, uuid).encode()
    assert wire == raw_init(chan_id, uuid)
    assert decode_init(wire, num_channels=chan_id + 1, expected_uuid=uuid) == MultiFDInit(
        chan_id, uuid
    )
    assert decode_init(wire, num_channels=256).id == chan_id


@st.composite
def packets(draw):
    page_shift = draw(st.sampled_from([9, 12, 16, 21]))
    page_size = 1 << page_shift
    max_pages = pages_per_packet(page_size)
    compression = draw(st.integers(0, 7))
    zero_field = draw(st.booleans())
    pages_alloc = draw(st.integers(0, max_pages))
    normal = draw(st.integers(0, pages_alloc))
    zero = draw(st.integers(0, pages_alloc - normal)) if zero_field else 0
    name = draw(block_names)
    block_pages = draw(st.integers(1, 4096))
    offsets = tuple(
        draw(
            st.lists(
                st.integers(0, block_pages - 1), min_size=normal + zero, max_size=normal + zero
            )
        )
    )
    offsets = tuple(o * page_size for o in offsets)
    sync = draw(st.booleans()) * MULTIFD_FLAG_SYNC
    packet_num = draw(st.integers(0, 2**64 - 1))
    raw = normal * page_size
    if compression:
        payload_size = lambda n: (1, n + n // 8 + 4096)  # noqa: E731
        next_size = draw(st.integers(1, raw + raw // 8 + 4096)) if normal else 0
    else:
        payload_size = lambda n: (n, n)  # noqa: E731
        next_size = raw
    if normal + zero == 0:
        name, offsets = "", ()
    pkt = MultiFDPacket(
        compression_flags(compression) | sync,
        pages_alloc,
        normal,
        next_size,
        packet_num,
        name,
        offsets,
        zero,
    )
    rules = PacketRules(page_size, max_pages, compression, payload_size, zero_field)
    blocks = {**BLOCKS, name: block_pages * page_size} if name else BLOCKS
    return pkt, rules, blocks


@settings(max_examples=300)
@given(packets())
def test_packet_roundtrip(case):
    pkt, rules, blocks = case
    wire = pkt.encode(rules.max_pages, zero_pages_field=rules.zero_pages_field)
    assert len(wire) == rules.header_size
    got = decode_packet(wire, rules, blocks)
    assert got == pkt
    assert tuple(got.normal_offsets) == tuple(pkt.offsets[: pkt.normal_pages])
    assert tuple(got.zero_offsets) == tuple(pkt.offsets[pkt.normal_pages :])
    # and the hand-made encoder agrees with encode() on the fields it can express
    if not rules.zero_pages_field and rules.max_pages == 128:
        assert wire == raw_packet(
            flags=pkt.flags,
            pages_alloc=pkt.pages_alloc,
            normal_pages=pkt.normal_pages,
            next_packet_size=pkt.next_packet_size,
            packet_num=pkt.packet_num,
            ramblock=pkt.ramblock.encode(),
            offsets=pkt.offsets,
        )


# --- init validation ----------------------------------------------------------------------

OTHER_UUID = bytes(range(16))

#: decode_init refusals: (init bytes, num_channels, expected_uuid, error, match)
INIT_REFUSALS = [
    *(
        pytest.param(
            raw_init(0).ljust(n, b"\0")[:n],
            1,
            None,
            errors.ProtocolError,
            f"{n} bytes",
            id=f"{n} bytes",
        )
        for n in (0, 63, 65, 1344)
    ),
    pytest.param(raw_init(0, magic=0x51454356), 1, None, errors.BadMagic, "0x51454356", id="magic"),
    pytest.param(raw_init(0, version=2), 1, None, errors.BadVersion, "version 2", id="version"),
    pytest.param(
        raw_init(1, UUID),
        2,
        OTHER_UUID,
        errors.UuidMismatch,
        f"{_uuid.UUID(bytes=UUID)} does not match {_uuid.UUID(bytes=OTHER_UUID)}",
        id="uuid",
    ),
    # all-zero expected (QEMU without -uuid) still rejects a set uuid
    pytest.param(raw_init(1, UUID), 2, bytes(16), errors.UuidMismatch, None, id="zero uuid"),
    pytest.param(raw_init(4), 4, None, errors.BadChannelId, "channel id 4", id="id 4 of 4"),
    pytest.param(raw_init(255), 8, None, errors.BadChannelId, "255", id="id 255 of 8"),
]


@pytest.mark.parametrize(("buf", "num_channels", "expected", "error", "match"), INIT_REFUSALS)
def test_init_refused(buf, num_channels, expected, error, match):
    with raises_exactly(error, match):
        decode_init(buf, num_channels=num_channels, expected_uuid=expected)


def test_init_accepted():
    assert decode_init(raw_init(3), num_channels=4).id == 3
    got = decode_init(raw_init(1, UUID), num_channels=2, expected_uuid=None)
    assert got.uuid == UUID and got.id == 1  # any uuid without an expected one
    buf = raw_init(2)[:25] + b"\xff" * 39  # the reserved bytes are not read
    assert decode_init(buf, num_channels=3).id == 2


# --- packet validation --------------------------------------------------------------------

ZSTD_RULES = PacketRules(compression=2, payload_size=lambda n: (1, n))
RULES_64K = PacketRules(page_size=65536, max_pages=8)
ZERO_RULES = PacketRules(zero_pages_field=True)


def zero_field(n: int) -> bytes:
    """The 32 unused bytes with QEMU 9's zero_pages field set to ``n``."""
    return n.to_bytes(4, "big") + bytes(28)


def refusal(name, buf, error, match=None, rules=RULES, blocks=BLOCKS):
    return pytest.param(buf, rules, blocks, error, match, id=name)


#: decode_packet refusals, in the order QEMU checks: (header, rules, blocks, error, match)
PACKET_REFUSALS = [
    *(
        refusal(
            f"{n} bytes", pages_packet().ljust(n, b"\0")[:n], errors.BadPacketSize, f"{n} bytes"
        )
        for n in (0, 64, 384, 1343, 1345)
    ),
    refusal(
        "header for fewer pages",
        pages_packet(pages_alloc=16, slots=16),
        errors.BadPacketSize,
        "expected 1344",
    ),
    refusal("magic", pages_packet(magic=0x51454356), errors.BadMagic, "0x51454356"),
    refusal("version", pages_packet(version=3), errors.BadVersion, "version 3"),
    *(
        refusal(f"flag {bit:#x}", pages_packet(flags=bit), errors.BadFlags, hex(bit))
        for bit in (0x10, 0x100, 0x80000000)
    ),
    # also on a page-less packet
    *(
        refusal(
            f"flag {bit:#x}, no pages", raw_packet(flags=bit | MULTIFD_FLAG_SYNC), errors.BadFlags
        )
        for bit in (0x10, 0x100, 0x80000000)
    ),
    # QEMU 9.x/10.x's 5-bit compression field and device-state flag (migration/multifd.h)
    refusal(
        "device-state packet (QEMU 10, VFIO)",
        raw_packet(flags=MULTIFD_FLAG_DEVICE_STATE),
        errors.BadFlags,
        "0x40 .*MULTIFD_FLAG_DEVICE_STATE: a device-state packet .*not supported",
    ),
    refusal(
        "device-state SYNC packet",
        raw_packet(flags=MULTIFD_FLAG_DEVICE_STATE | MULTIFD_FLAG_SYNC),
        errors.BadFlags,
        "DEVICE_STATE",
    ),
    refusal("uadk pages", pages_packet(flags=MULTIFD_FLAG_UADK), errors.BadFlags, "uadk"),
    refusal("qatzip pages", pages_packet(flags=MULTIFD_FLAG_QATZIP), errors.BadFlags, "qatzip"),
    refusal(
        "qpl pages, nocomp here",
        pages_packet(flags=MULTIFD_FLAG_QPL),
        errors.CompressionMismatch,
        "compression 4 .*negotiated 0",
    ),
    refusal(
        "zlib pages, nocomp here",
        pages_packet(flags=MULTIFD_FLAG_ZLIB),
        errors.CompressionMismatch,
        "compression 1",
    ),
    refusal(
        "nocomp pages, zstd here",
        pages_packet(flags=0),
        errors.CompressionMismatch,
        "negotiated 2",
        ZSTD_RULES,
    ),
    refusal(
        "zlib+sync pages, zstd here",
        pages_packet(flags=MULTIFD_FLAG_ZLIB | 1),
        errors.CompressionMismatch,
        None,
        ZSTD_RULES,
    ),
    refusal(
        "pages_alloc 129", pages_packet(pages_alloc=129), errors.BadPagesAlloc, "pages_alloc 129"
    ),
    # even on a page-less packet: QEMU refuses it before looking at anything else
    refusal(
        "pages_alloc 2**32-1, no pages", raw_packet(pages_alloc=0xFFFFFFFF), errors.BadPagesAlloc
    ),
    refusal(
        "pages_alloc over 8 with 64k pages",
        raw_packet(pages_alloc=128, slots=8),
        errors.BadPagesAlloc,
        "8",
        RULES_64K,
    ),
    refusal(
        "normal_pages over pages_alloc",
        pages_packet(pages_alloc=2, normal_pages=3),
        errors.BadNormalPages,
        "normal_pages 3 exceeds pages_alloc 2",
    ),
    refusal(
        "zero pages over pages_alloc",
        pages_packet(offsets=(0, PAGE, 2 * PAGE), pages_alloc=3, unused=zero_field(2)),
        errors.BadNormalPages,
        "zero_pages 2",
        ZERO_RULES,
    ),
    refusal(
        "zero_pages 2**32-1",
        pages_packet(unused=b"\xff\xff\xff\xff" + bytes(28)),
        errors.BadNormalPages,
        None,
        ZERO_RULES,
    ),  # no overflow trick
    refusal("unknown block", pages_packet(name=b"pc.rom"), errors.UnknownBlock, "'pc.rom'"),
    refusal("no block name", pages_packet(name=b""), errors.UnknownBlock),
    refusal(
        "block name not UTF-8",
        pages_packet(name=b"pc.\xff\xferam"),
        errors.UnknownBlock,
        "not UTF-8",
    ),
    refusal(
        "unknown block, zero pages only",
        pages_packet(name=b"nope", offsets=(0,), normal_pages=0, unused=zero_field(1)),
        errors.UnknownBlock,
        None,
        ZERO_RULES,
    ),
    refusal(
        "unaligned offset",
        pages_packet(offsets=(0x1000, 0x1001)),
        errors.BadOffset,
        r"0x1001 .*not page-aligned",
    ),
    refusal(
        "unaligned zero page",
        pages_packet(offsets=(0x1000, 0x3000, 0x0, 0x2001), unused=zero_field(2), normal_pages=2),
        errors.BadOffset,
        "0x2001",
        ZERO_RULES,
    ),
    refusal(
        "offset at the block's end",
        pages_packet(b"pc.bios", (0, BLOCKS["pc.bios"])),
        errors.BadOffset,
        "outside the block",
    ),
    refusal(
        "offset near 2**64", pages_packet(b"pc.bios", (2**64 - PAGE,)), errors.BadOffset, "outside"
    ),
    # a block smaller than a page holds no page at all
    refusal(
        "block smaller than a page",
        pages_packet(b"tiny", (0,)),
        errors.BadOffset,
        None,
        RULES,
        {"tiny": 512},
    ),
    *(
        refusal(
            f"nocomp next_packet_size {delta:+}",
            pages_packet(next_packet_size=2 * PAGE + delta),
            errors.BadPacketSize,
            f"next_packet_size {2 * PAGE + delta}",
        )
        for delta in (-1, +1, -PAGE, +PAGE)
    ),
]


@pytest.mark.parametrize(("buf", "rules", "blocks", "error", "match"), PACKET_REFUSALS)
def test_packet_refused(buf, rules, blocks, error, match):
    with raises_exactly(error, match):
        decode_packet(buf, rules, blocks)


def test_packet_accepted_at_the_limits():
    small = PacketRules(max_pages=16)
    buf = pages_packet(pages_alloc=16, slots=16)
    assert len(buf) == 448
    assert decode_packet(buf, small, BLOCKS).normal_pages == 2  # the header length follows rules
    assert decode_packet(pages_packet(flags=MULTIFD_FLAG_ZSTD), ZSTD_RULES, BLOCKS).compression == 2
    assert decode_packet(raw_packet(pages_alloc=8, slots=8), RULES_64K, BLOCKS).pages_alloc == 8
    got = decode_packet(pages_packet(pages_alloc=2), RULES, BLOCKS)
    assert got.normal_pages == got.pages_alloc == 2
    size = BLOCKS["pc.bios"]
    got = decode_packet(pages_packet(b"pc.bios", (0, size - PAGE)), RULES, BLOCKS)
    assert tuple(got.offsets) == (0, size - PAGE)
    # the name stops at the first NUL
    got = decode_packet(pages_packet(name=b"pc.ram\0garbage"), RULES, BLOCKS)
    assert got.ramblock == "pc.ram"


@pytest.mark.parametrize("flags", [0x2, 0x4, 0xE, 0x3, 0xF])
def test_pageless_packet_any_compression_bits(flags):
    # QEMU sends page-less packets with no compression bits and does not check them
    got = decode_packet(raw_packet(flags=flags), RULES, BLOCKS)
    assert got.normal_pages == 0 and got.flags == flags
    assert got.sync is bool(flags & 1)


def test_compressed_next_packet_size_bounds():
    seen = []

    def payload_size(raw_len):
        seen.append(raw_len)
        return 10, raw_len + 100

    rules = PacketRules(compression=1, payload_size=payload_size)
    for ok in (10, 11, 2 * PAGE, 2 * PAGE + 100):
        got = decode_packet(pages_packet(flags=0x2, next_packet_size=ok), rules, BLOCKS)
        assert got.next_packet_size == ok
    assert set(seen) == {2 * PAGE}
    for bad in (0, 9, 2 * PAGE + 101):
        with raises_exactly(errors.BadPacketSize, "expected 10..8292"):
            decode_packet(pages_packet(flags=0x2, next_packet_size=bad), rules, BLOCKS)


def test_pageless_packet_leftovers_ignored():
    buf = raw_packet(
        flags=MULTIFD_FLAG_SYNC,
        next_packet_size=12345,
        ramblock=b"\xff\xfegarbage-not-a-block",
        offsets=(0x1001, 2**64 - 1, 7),
        packet_num=9,
    )
    got = decode_packet(buf, RULES, BLOCKS)
    assert got == MultiFDPacket(MULTIFD_FLAG_SYNC, 128, 0, 0, 9)
    assert got.ramblock == "" and tuple(got.offsets) == () and got.next_packet_size == 0


def test_offsets_past_normal_pages_ignored():
    offsets = (0x1000, 0x3000, 0x1001, 2**64 - 1, BLOCKS["pc.ram"])
    buf = pages_packet(offsets=offsets, normal_pages=2)
    got = decode_packet(buf, RULES, BLOCKS)
    assert tuple(got.offsets) == (0x1000, 0x3000)


def test_block_name_of_255_bytes():
    name = b"n" * 255
    blocks = {name.decode(): 1 << 20}
    got = decode_packet(pages_packet(name=name), RULES, blocks)
    assert got.ramblock == name.decode()
    # QEMU forces ramblock[255] = 0: a non-NUL last byte is ignored
    buf = bytearray(pages_packet(name=name))
    buf[64 + 255] = ord("X")
    assert decode_packet(bytes(buf), RULES, blocks).ramblock == name.decode()
    # and encode produces it
    wire = MultiFDPacket(0, 128, 1, PAGE, 0, name.decode(), (0,)).encode()
    assert wire[64:319] == name and wire[319] == 0


def test_qemu_9_flag_values():
    # migration/multifd.h of QEMU 9.2 / 10.0: one-hot values in 5 bits from bit 1, then 0x40
    assert (MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD, MULTIFD_FLAG_QPL) == (0x2, 0x4, 0x8)
    assert (MULTIFD_FLAG_UADK, MULTIFD_FLAG_QATZIP, MULTIFD_FLAG_DEVICE_STATE) == (0x10, 0x20, 0x40)
    assert compression_value(MULTIFD_FLAG_QATZIP | MULTIFD_FLAG_SYNC) == 16


#: The first 64 bytes of two packets a real QEMU 10.0 sent (pc-q35-10.0, nocomp,
#: zero-page-detection=multifd): a SYNC packet (pages_alloc 0, no pages), and a packet of 128
#: zero pages of pc.ram (normal_pages 0, zero_pages 128, next_packet_size 0, packet_num 2).
QEMU10_SYNC = bytes.fromhex(
    "11223344 00000001 00000001 00000000 00000000 00000000 0000000000000000"
) + bytes(32)
QEMU10_ZERO = bytes.fromhex(
    "11223344 00000001 00000000 00000080 00000000 00000000 0000000000000002 00000080"
) + bytes(28)


def test_qemu10_sync_packet_golden():
    buf = QEMU10_SYNC + bytes(HEADER - 64)
    for rules in (RULES, ZERO_RULES):
        got = decode_packet(buf, rules, BLOCKS)
        assert got.sync and (got.pages_alloc, got.normal_pages, got.zero_pages) == (0, 0, 0)


def test_qemu10_zero_page_packet_golden():
    offsets = [PAGE * (i + 1) for i in range(127)] + [0]
    buf = QEMU10_ZERO + b"pc.ram".ljust(256, b"\0") + struct.pack(">128Q", *offsets)
    got = decode_packet(buf, ZERO_RULES, BLOCKS)
    assert (got.normal_pages, got.zero_pages, got.next_packet_size) == (0, 128, 0)
    assert got.ramblock == "pc.ram" and list(got.zero_offsets) == offsets
    assert got.encode(zero_pages_field=True) == buf
    # read as QEMU 7.2's unused bytes, the same packet carries nothing
    assert decode_packet(buf, RULES, BLOCKS).zero_pages == 0


def test_7_2_ignores_the_unused_field():
    # without zero_pages_field, bytes 32..63 are QEMU 7.2's unused[4]: not read
    buf = pages_packet(unused=b"\0\0\0\x05" + b"\xaa" * 28)
    got = decode_packet(buf, RULES, BLOCKS)
    assert got.zero_pages == 0 and tuple(got.offsets) == (0x1000, 0x3000)


def test_zero_pages_field():
    buf = pages_packet(
        offsets=(0x1000, 0x3000, 0x0, 0x8000, 0x2000), normal_pages=2, unused=zero_field(3)
    )
    got = decode_packet(buf, ZERO_RULES, BLOCKS)
    assert got.normal_pages == 2 and got.zero_pages == 3
    assert tuple(got.normal_offsets) == (0x1000, 0x3000)
    assert tuple(got.zero_offsets) == (0x0, 0x8000, 0x2000)
    assert got.next_packet_size == 2 * PAGE
    # encode() puts zero_pages at offset 32
    assert got.encode(zero_pages_field=True) == buf


def test_zero_pages_only_packet():
    buf = pages_packet(
        offsets=(0x0, 0x5000), normal_pages=0, next_packet_size=0, unused=zero_field(2)
    )
    got = decode_packet(buf, ZERO_RULES, BLOCKS)
    assert got.normal_pages == 0 and tuple(got.zero_offsets) == (0x0, 0x5000)
    assert got.ramblock == "pc.ram" and got.next_packet_size == 0
    # no payload follows a packet without normal pages, whatever next_packet_size says
    stale = pages_packet(offsets=(0x0,), normal_pages=0, next_packet_size=999, unused=zero_field(1))
    assert decode_packet(stale, ZERO_RULES, BLOCKS).next_packet_size == 0


# --- robustness ---------------------------------------------------------------------------


@st.composite
def plausible_headers(draw):
    """Headers that pass the first checks often enough to reach the later ones."""
    fields = struct.pack(
        ">IIIIIIQ",
        draw(st.sampled_from([0x11223344, 0x11223344, 0x11223344, 0])),
        draw(st.sampled_from([1, 1, 1, 2])),
        draw(st.one_of(st.integers(0, 0xF), st.integers(0, 2**32 - 1))),
        draw(st.one_of(st.integers(0, 130), st.integers(0, 2**32 - 1))),
        draw(st.one_of(st.integers(0, 130), st.integers(0, 2**32 - 1))),
        draw(st.one_of(st.sampled_from([0, PAGE, 2 * PAGE]), st.integers(0, 2**32 - 1))),
        draw(st.integers(0, 2**64 - 1)),
    )
    unused = draw(st.one_of(st.just(bytes(32)), st.binary(min_size=32, max_size=32)))
    name = draw(
        st.one_of(
            st.sampled_from([b"pc.ram", b"pc.bios", b"x" * 256]),
            st.binary(min_size=256, max_size=256),
        )
    ).ljust(256, b"\0")
    offsets = b"".join(
        o.to_bytes(8, "big")
        for o in draw(
            st.lists(
                st.one_of(st.integers(0, 255).map(lambda p: p * PAGE), st.integers(0, 2**64 - 1)),
                min_size=128,
                max_size=128,
            )
        )
    )
    return fields + unused + name + offsets


@settings(max_examples=300)
@given(
    buf=st.one_of(st.binary(min_size=HEADER, max_size=HEADER), plausible_headers()),
    zero_field=st.booleans(),
    compression=st.integers(0, 7),
)
def test_decode_packet_only_raises_multifd_errors(buf, zero_field, compression):
    assert len(buf) == HEADER
    rules = PacketRules(
        compression=compression,
        payload_size=(lambda n: (n, n)) if compression == 0 else (lambda n: (1, 2 * n)),
        zero_pages_field=zero_field,
    )
    try:
        got = decode_packet(buf, rules, BLOCKS)
    except errors.MultiFDError:
        return
    # whatever is accepted is consistent
    assert got.normal_pages + got.zero_pages <= got.pages_alloc <= 128
    if got.normal_pages + got.zero_pages:
        size = BLOCKS[got.ramblock]
        assert all(o % PAGE == 0 and o + PAGE <= size for o in got.offsets)


@settings(max_examples=300)
@given(
    buf=st.one_of(
        st.binary(min_size=64, max_size=64),
        st.binary(min_size=56, max_size=56).map(lambda b: b"\x11\x22\x33\x44\0\0\0\1" + b),
        st.binary(max_size=100),
    ),
    expected=st.one_of(st.none(), st.binary(min_size=16, max_size=16)),
)
def test_decode_init_only_raises_multifd_errors(buf, expected):
    try:
        got = decode_init(buf, num_channels=4, expected_uuid=expected)
    except errors.MultiFDError:
        return
    assert 0 <= got.id < 4
