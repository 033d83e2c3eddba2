"""The multifd codec against WIRE.md: golden bytes built by hand, round-trips, every rule."""

from __future__ import annotations

import struct
import uuid as _uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd_core.errors import (
    BadChannelId,
    BadFlags,
    BadMagic,
    BadNormalPages,
    BadOffset,
    BadPacketSize,
    BadPagesAlloc,
    BadVersion,
    CompressionMismatch,
    ConfigError,
    MultiFDError,
    ProtocolError,
    UnknownBlock,
    UuidMismatch,
)
from multifd_core.wire import (
    MULTIFD_FLAG_SYNC,
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
    with raises_exactly(ConfigError, "256"):
        MultiFDInit(256).encode()
    with raises_exactly(ConfigError):
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
    with raises_exactly(BadOffset, "aligned"):
        decode_packet(bad, rules, BLOCKS)


def test_page_geometry():
    assert pages_per_packet(4096) == 128
    assert packet_header_size(128) == HEADER
    assert RULES.header_size == HEADER
    assert pages_per_packet(1 << 20) == 1  # pages larger than a packet: one per packet
    for bad in (0, 256, 1000, 4095, 4097):
        with raises_exactly(ConfigError, "power of two"):
            check_page_size(bad)
        with raises_exactly(ConfigError):
            pages_per_packet(bad)


def test_compression_flags_range():
    assert [compression_flags(v) for v in range(8)] == [v << 1 for v in range(8)]
    for bad in (8, -1):
        with raises_exactly(ConfigError, str(bad)):
            compression_flags(bad)
    assert compression_value(0xF) == 7 and compression_value(0x1) == 0


def test_uuid_bytes():
    u = _uuid.UUID(bytes=UUID)
    assert uuid_bytes(None) == bytes(16)
    assert uuid_bytes(u) == UUID
    assert uuid_bytes(str(u)) == UUID
    assert uuid_bytes(UUID) == UUID
    with raises_exactly(ConfigError, "16 bytes"):
        uuid_bytes(UUID[:15])
    with raises_exactly(ConfigError, "bad uuid"):
        uuid_bytes("not-a-uuid")


def test_encode_block_name_limits():
    assert encode_block_name("x" * 255) == b"x" * 255
    for bad in ("", "x" * 256, "a\0b", "é" * 128):
        with raises_exactly(ConfigError, "RAM block name"):
            encode_block_name(bad)


def test_encode_refuses_inconsistent_packets():
    with raises_exactly(ConfigError, "offsets"):
        MultiFDPacket(0, 128, 2, 2 * PAGE, 0, "pc.ram", (0,)).encode()
    with raises_exactly(ConfigError, "offsets"):
        MultiFDPacket(0, 2, 3, 3 * PAGE, 0, "pc.ram", (0, PAGE, 2 * PAGE)).encode()
    with raises_exactly(ConfigError, "zero_pages"):
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


@pytest.mark.parametrize("size", [0, 63, 65, 1344])
def test_init_bad_length(size):
    buf = raw_init(0).ljust(size, b"\0")[:size]
    with raises_exactly(ProtocolError, f"{size} bytes"):
        decode_init(buf, num_channels=1)


def test_init_bad_magic():
    with raises_exactly(BadMagic, "0x51454356"):
        decode_init(raw_init(0, magic=0x51454356), num_channels=1)


def test_init_bad_version():
    with raises_exactly(BadVersion, "version 2"):
        decode_init(raw_init(0, version=2), num_channels=1)


def test_init_uuid_mismatch():
    other = bytes(range(16))
    with raises_exactly(UuidMismatch) as info:
        decode_init(raw_init(1, UUID), num_channels=2, expected_uuid=other)
    msg = str(info.value)
    assert str(_uuid.UUID(bytes=UUID)) in msg and str(_uuid.UUID(bytes=other)) in msg
    # all-zero expected (QEMU without -uuid) still rejects a set uuid
    with raises_exactly(UuidMismatch):
        decode_init(raw_init(1, UUID), num_channels=2, expected_uuid=bytes(16))


def test_init_uuid_ignored_without_expected():
    got = decode_init(raw_init(1, UUID), num_channels=2, expected_uuid=None)
    assert got.uuid == UUID and got.id == 1


def test_init_channel_id_out_of_range():
    assert decode_init(raw_init(3), num_channels=4).id == 3
    with raises_exactly(BadChannelId, "channel id 4"):
        decode_init(raw_init(4), num_channels=4)
    with raises_exactly(BadChannelId, "255"):
        decode_init(raw_init(255), num_channels=8)


def test_init_reserved_bytes_ignored():
    buf = raw_init(2)[:25] + b"\xff" * 39
    assert decode_init(buf, num_channels=3).id == 2


# --- packet validation --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 64, 384, 1343, 1345])
def test_packet_wrong_header_length(size):
    buf = pages_packet().ljust(size, b"\0")[:size]
    with raises_exactly(BadPacketSize, f"{size} bytes"):
        decode_packet(buf, RULES, BLOCKS)


def test_packet_header_length_follows_rules():
    small = PacketRules(max_pages=16)
    buf = pages_packet(pages_alloc=16, slots=16)
    assert len(buf) == 448
    assert decode_packet(buf, small, BLOCKS).normal_pages == 2
    with raises_exactly(BadPacketSize, "expected 1344"):
        decode_packet(buf, RULES, BLOCKS)


def test_packet_bad_magic():
    with raises_exactly(BadMagic, "0x51454356"):
        decode_packet(pages_packet(magic=0x51454356), RULES, BLOCKS)


def test_packet_bad_version():
    with raises_exactly(BadVersion, "version 3"):
        decode_packet(pages_packet(version=3), RULES, BLOCKS)


@pytest.mark.parametrize("bit", [0x10, 0x100, 0x80000000])
def test_packet_unknown_flag_bits(bit):
    with raises_exactly(BadFlags, hex(bit)):
        decode_packet(pages_packet(flags=bit), RULES, BLOCKS)
    # also on a page-less packet
    with raises_exactly(BadFlags):
        decode_packet(raw_packet(flags=bit | MULTIFD_FLAG_SYNC), RULES, BLOCKS)


def test_packet_compression_mismatch_with_pages():
    with raises_exactly(CompressionMismatch, "compression 1"):
        decode_packet(pages_packet(flags=MULTIFD_FLAG_ZLIB), RULES, BLOCKS)
    zstd = PacketRules(compression=2, payload_size=lambda n: (1, n))
    with raises_exactly(CompressionMismatch, "negotiated 2"):
        decode_packet(pages_packet(flags=0), zstd, BLOCKS)
    with raises_exactly(CompressionMismatch):
        decode_packet(pages_packet(flags=MULTIFD_FLAG_ZLIB | 1), zstd, BLOCKS)
    assert decode_packet(pages_packet(flags=MULTIFD_FLAG_ZSTD), zstd, BLOCKS).compression == 2


@pytest.mark.parametrize("flags", [0x2, 0x4, 0xE, 0x3, 0xF])
def test_pageless_packet_any_compression_bits(flags):
    # QEMU sends page-less packets with no compression bits and does not check them
    got = decode_packet(raw_packet(flags=flags), RULES, BLOCKS)
    assert got.normal_pages == 0 and got.flags == flags
    assert got.sync is bool(flags & 1)


def test_packet_pages_alloc_over_max():
    with raises_exactly(BadPagesAlloc, "pages_alloc 129"):
        decode_packet(pages_packet(pages_alloc=129), RULES, BLOCKS)
    # even on a page-less packet: QEMU refuses it before looking at anything else
    with raises_exactly(BadPagesAlloc):
        decode_packet(raw_packet(pages_alloc=0xFFFFFFFF), RULES, BLOCKS)
    rules64 = PacketRules(page_size=65536, max_pages=8)
    with raises_exactly(BadPagesAlloc, "8"):
        decode_packet(raw_packet(pages_alloc=128, slots=8), rules64, BLOCKS)
    assert decode_packet(raw_packet(pages_alloc=8, slots=8), rules64, BLOCKS).pages_alloc == 8


def test_packet_normal_pages_over_pages_alloc():
    with raises_exactly(BadNormalPages, "normal_pages 3 exceeds pages_alloc 2"):
        decode_packet(pages_packet(pages_alloc=2, normal_pages=3), RULES, BLOCKS)
    got = decode_packet(pages_packet(pages_alloc=2), RULES, BLOCKS)
    assert got.normal_pages == got.pages_alloc == 2


def test_packet_unknown_block():
    with raises_exactly(UnknownBlock, "'pc.rom'"):
        decode_packet(pages_packet(name=b"pc.rom"), RULES, BLOCKS)
    with raises_exactly(UnknownBlock):
        decode_packet(pages_packet(name=b""), RULES, BLOCKS)
    # the name stops at the first NUL
    got = decode_packet(pages_packet(name=b"pc.ram\0garbage"), RULES, BLOCKS)
    assert got.ramblock == "pc.ram"


def test_packet_unaligned_offset():
    with raises_exactly(BadOffset, r"0x1001 .*not page-aligned"):
        decode_packet(pages_packet(offsets=(0x1000, 0x1001)), RULES, BLOCKS)


def test_packet_offset_past_end():
    size = BLOCKS["pc.bios"]
    got = decode_packet(pages_packet(b"pc.bios", (0, size - PAGE)), RULES, BLOCKS)
    assert tuple(got.offsets) == (0, size - PAGE)
    with raises_exactly(BadOffset, "outside the block"):
        decode_packet(pages_packet(b"pc.bios", (0, size)), RULES, BLOCKS)
    with raises_exactly(BadOffset, "outside"):
        decode_packet(pages_packet(b"pc.bios", (2**64 - PAGE,)), RULES, BLOCKS)
    # a block smaller than a page holds no page at all
    with raises_exactly(BadOffset):
        decode_packet(pages_packet(b"tiny", (0,)), RULES, {"tiny": 512})


@pytest.mark.parametrize("delta", [-1, +1, -PAGE, +PAGE])
def test_nocomp_next_packet_size_must_match(delta):
    with raises_exactly(BadPacketSize, f"next_packet_size {2 * PAGE + delta}"):
        decode_packet(pages_packet(next_packet_size=2 * PAGE + delta), RULES, BLOCKS)


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
        with raises_exactly(BadPacketSize, "expected 10..8292"):
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


def test_non_utf8_block_name():
    with raises_exactly(UnknownBlock, "not UTF-8"):
        decode_packet(pages_packet(name=b"pc.\xff\xferam"), RULES, BLOCKS)


def test_7_2_ignores_the_unused_field():
    # without zero_pages_field, bytes 32..63 are QEMU 7.2's unused[4]: not read
    buf = pages_packet(unused=b"\0\0\0\x05" + b"\xaa" * 28)
    got = decode_packet(buf, RULES, BLOCKS)
    assert got.zero_pages == 0 and tuple(got.offsets) == (0x1000, 0x3000)


def test_zero_pages_field():
    rules = PacketRules(zero_pages_field=True)
    buf = pages_packet(
        offsets=(0x1000, 0x3000, 0x0, 0x8000, 0x2000),
        normal_pages=2,
        unused=(3).to_bytes(4, "big") + bytes(28),
    )
    got = decode_packet(buf, rules, BLOCKS)
    assert got.normal_pages == 2 and got.zero_pages == 3
    assert tuple(got.normal_offsets) == (0x1000, 0x3000)
    assert tuple(got.zero_offsets) == (0x0, 0x8000, 0x2000)
    assert got.next_packet_size == 2 * PAGE
    # encode() puts zero_pages at offset 32
    assert got.encode(zero_pages_field=True) == buf


def test_zero_pages_only_packet():
    rules = PacketRules(zero_pages_field=True)
    buf = pages_packet(
        offsets=(0x0, 0x5000), normal_pages=0, next_packet_size=0, unused=b"\0\0\0\2" + bytes(28)
    )
    got = decode_packet(buf, rules, BLOCKS)
    assert got.normal_pages == 0 and tuple(got.zero_offsets) == (0x0, 0x5000)
    assert got.ramblock == "pc.ram" and got.next_packet_size == 0
    # no payload follows a packet without normal pages, whatever next_packet_size says
    stale = pages_packet(
        offsets=(0x0,), normal_pages=0, next_packet_size=999, unused=b"\0\0\0\1" + bytes(28)
    )
    assert decode_packet(stale, rules, BLOCKS).next_packet_size == 0


def test_zero_pages_are_validated():
    rules = PacketRules(zero_pages_field=True)
    two_zero = (2).to_bytes(4, "big") + bytes(28)
    with raises_exactly(BadNormalPages, "zero_pages 2"):
        decode_packet(
            pages_packet(offsets=(0, PAGE, 2 * PAGE), pages_alloc=3, unused=two_zero),
            rules,
            BLOCKS,
        )
    with raises_exactly(BadNormalPages):
        decode_packet(
            pages_packet(unused=b"\xff\xff\xff\xff" + bytes(28)), rules, BLOCKS
        )  # no overflow trick
    with raises_exactly(BadOffset, "0x2001"):
        decode_packet(
            pages_packet(offsets=(0x1000, 0x3000, 0x0, 0x2001), unused=two_zero, normal_pages=2),
            rules,
            BLOCKS,
        )
    with raises_exactly(UnknownBlock):
        decode_packet(
            pages_packet(
                name=b"nope", offsets=(0,), normal_pages=0, unused=b"\0\0\0\1" + bytes(28)
            ),
            rules,
            BLOCKS,
        )


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
    except MultiFDError:
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
    except MultiFDError:
        return
    assert 0 <= got.id < 4
