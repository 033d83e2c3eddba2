"""Sans-I/O codec for the multifd channels: MultiFDInit_t and MultiFDPacket_t.

Byte-compatible with QEMU 7.2 (../shared/WIRE.md), and reads what QEMU 9.x/10.x added (the
``zero_pages`` field, the 5-bit compression field: docs/qemu-versions.md): big-endian, packed.
No I/O, no trio: bytes in, objects out, and back. Every validation rule for the multifd channels
lives here once.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, reduce
from operator import or_
from typing import NoReturn

from .errors import (
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
    ProtocolError,
    UnknownBlock,
    UuidMismatch,
)
from .extension import MAX_PACKET_PAGES, pack_init_extension, unpack_init_extension

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")

MULTIFD_FLAG_SYNC = 1 << 0
#: The compression field: 3 bits in QEMU 7.2, 5 bits of one-hot values since QEMU 9.x
#: (migration/multifd.h). Methods here are keyed 0..7 (the 7.2 field); a value above 7 (uadk,
#: qatzip) is refused as a flag no method here can have.
MULTIFD_FLAG_COMPRESSION_MASK = 0x1F << 1
MULTIFD_FLAG_NOCOMP = 0 << 1
MULTIFD_FLAG_ZLIB = 1 << 1
MULTIFD_FLAG_ZSTD = 2 << 1
MULTIFD_FLAG_QPL = 4 << 1  # QEMU 9.1+
MULTIFD_FLAG_UADK = 8 << 1  # QEMU 9.1+
MULTIFD_FLAG_QATZIP = 16 << 1  # QEMU 9.2+
#: QEMU 10.0: a device-state packet (VFIO's multifd device state), another header layout.
MULTIFD_FLAG_DEVICE_STATE = 32 << 1
#: The flags of a packet this side reads: SYNC and a 7.2 compression value.
MULTIFD_KNOWN_FLAGS = MULTIFD_FLAG_SYNC | 7 << 1
#: QEMU's names of the compression bits beyond the 7.2 field, for refusals.
_LATER_FLAG_NAMES = {
    MULTIFD_FLAG_UADK: "compression uadk (QEMU 9.1+)",
    MULTIFD_FLAG_QATZIP: "compression qatzip (QEMU 9.2+)",
    MULTIFD_FLAG_DEVICE_STATE: "MULTIFD_FLAG_DEVICE_STATE: a device-state packet (QEMU 10 VFIO)",
}

#: Bytes of page data a packet carries at most (QEMU's MULTIFD_PACKET_SIZE).
MULTIFD_PACKET_SIZE = 512 * 1024
MULTIFD_INIT_SIZE = 64
#: The fixed part of MultiFDPacket_t, before offset[].
MULTIFD_PACKET_FIXED_SIZE = 320
RAMBLOCK_NAME_FIELD = 256
#: Longest RAM block name (QEMU's idstr is 256 bytes with its NUL).
RAMBLOCK_NAME_MAX = RAMBLOCK_NAME_FIELD - 1
MAX_CHANNELS = 256  # the id is one byte

_INIT = struct.Struct(">II16sB39x")
_HEAD = struct.Struct(">IIIIIIQ")  # magic .. packet_num: 32 bytes
_ZERO_PAGES = struct.Struct(">I")  # QEMU 9.0+: zero_pages at offset 32
_RAMBLOCK_AT = 64
_OFFSETS_AT = MULTIFD_PACKET_FIXED_SIZE
ZERO_UUID = bytes(16)


def compression_flags(value: int) -> int:
    """The flag bits of compression method ``value`` (0..7)."""
    if not 0 <= value <= 7:
        raise ConfigError(f"compression value {value} outside 0..7")
    return value << 1


def compression_value(flags: int) -> int:
    """The compression method value held in ``flags`` (0..31: QEMU 9's 5-bit field)."""
    return (flags & MULTIFD_FLAG_COMPRESSION_MASK) >> 1


def pages_per_packet(page_size: int) -> int:
    """QEMU's page_count: pages of ``page_size`` in one MULTIFD_PACKET_SIZE packet."""
    check_page_size(page_size)
    return max(1, MULTIFD_PACKET_SIZE // page_size)


def packet_pages(packet_size: int, page_size: int) -> int:
    """Pages of ``page_size`` in a packet of ``packet_size`` bytes of pages (at least one)."""
    return min(MAX_PACKET_PAGES, max(1, packet_size // page_size))


def packet_header_size(pages_alloc: int) -> int:
    """Bytes of a packet header with room for ``pages_alloc`` offsets (1344 for 128)."""
    return MULTIFD_PACKET_FIXED_SIZE + 8 * pages_alloc


def check_page_size(page_size: int) -> None:
    if page_size < 512 or page_size & (page_size - 1):
        raise ConfigError(f"page size {page_size} is not a power of two >= 512")


def encode_block_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not raw or len(raw) > RAMBLOCK_NAME_MAX or b"\0" in raw:
        raise ConfigError(f"RAM block name {name!r} must be 1..{RAMBLOCK_NAME_MAX} bytes, no NUL")
    return raw


def uuid_bytes(value: str | bytes | _uuid.UUID | None) -> bytes:
    """Normalise a uuid given as text, 16 bytes, UUID or None (all zero, as QEMU without -uuid)."""
    if value is None:
        return ZERO_UUID
    if isinstance(value, _uuid.UUID):
        return value.bytes
    if isinstance(value, bytes):
        if len(value) != 16:
            raise ConfigError(f"uuid must be 16 bytes, got {len(value)}")
        return value
    try:
        return _uuid.UUID(value).bytes
    except ValueError as exc:
        raise ConfigError(f"bad uuid {value!r}") from exc


# --- MultiFDInit_t --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MultiFDInit:
    """The 64-byte init packet that opens every multifd channel.

    ``features``: the multifd-py extension's feature bits (MULTIFD_EXT_*); 0 sends QEMU's own
    bytes (zeros where the extension would be). ``packet_pages``: with
    MULTIFD_EXT_PACKET_PAGES, the pages each of the channel's packets has room for."""

    id: int
    uuid: bytes = ZERO_UUID
    magic: int = MULTIFD_MAGIC
    version: int = MULTIFD_VERSION
    features: int = 0
    packet_pages: int = 0

    def encode(self) -> bytes:
        if not 0 <= self.id < MAX_CHANNELS:
            raise ConfigError(f"channel id {self.id} outside 0..{MAX_CHANNELS - 1}")
        buf = bytearray(_INIT.pack(self.magic, self.version, self.uuid, self.id))
        pack_init_extension(buf, self.features, self.packet_pages)
        return bytes(buf)


def decode_init(
    buf: bytes | bytearray | memoryview,
    *,
    num_channels: int,
    expected_uuid: bytes | None = None,
) -> MultiFDInit:
    """Decode and validate an init packet as QEMU's multifd_recv_initial_packet does.

    ``expected_uuid`` None accepts any uuid (QEMU compares with its own, all zero by default).
    """
    if len(buf) != MULTIFD_INIT_SIZE:
        raise ProtocolError(f"init packet is {len(buf)} bytes, expected {MULTIFD_INIT_SIZE}")
    magic, version, uuid, chan_id = _INIT.unpack(buf)
    if magic != MULTIFD_MAGIC:
        raise BadMagic(f"init packet magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
    if version != MULTIFD_VERSION:
        raise BadVersion(f"init packet version {version}, expected {MULTIFD_VERSION}")
    if expected_uuid is not None and uuid != expected_uuid:
        raise UuidMismatch(
            f"channel {chan_id} uuid {_uuid.UUID(bytes=uuid)} does not match "
            f"{_uuid.UUID(bytes=expected_uuid)}"
        )
    if chan_id >= num_channels:
        raise BadChannelId(f"channel id {chan_id} outside 0..{num_channels - 1}")
    features, pages = unpack_init_extension(buf, chan_id)
    return MultiFDInit(id=chan_id, uuid=uuid, features=features, packet_pages=pages)


# --- MultiFDPacket_t ------------------------------------------------------------------------


@dataclass(slots=True)
class MultiFDPacket:
    """One packet header: which pages of which block follow, and how many payload bytes.

    ``offsets`` holds the normal pages' offsets, then (only with the QEMU 9 zero-page field)
    the zero pages' offsets.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    ramblock: str = ""
    offsets: Sequence[int] = field(default_factory=tuple)
    zero_pages: int = 0

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def compression(self) -> int:
        return compression_value(self.flags)

    @property
    def normal_offsets(self) -> Sequence[int]:
        return self.offsets[: self.normal_pages]

    @property
    def zero_offsets(self) -> Sequence[int]:
        return self.offsets[self.normal_pages : self.normal_pages + self.zero_pages]

    def encode(self, header_pages: int | None = None, *, zero_pages_field: bool = False) -> bytes:
        """Encode to a header of ``320 + 8 * header_pages`` bytes (default: pages_alloc)."""
        header_pages = self.pages_alloc if header_pages is None else header_pages
        npages = len(self.offsets)
        if npages != self.normal_pages + self.zero_pages or npages > header_pages:
            raise ConfigError(f"{npages} offsets do not fit this packet")
        if self.zero_pages and not zero_pages_field:
            raise ConfigError("zero pages in a packet need the zero_pages field")
        buf = bytearray(packet_header_size(header_pages))
        _HEAD.pack_into(
            buf,
            0,
            MULTIFD_MAGIC,
            MULTIFD_VERSION,
            self.flags,
            self.pages_alloc,
            self.normal_pages,
            self.next_packet_size,
            self.packet_num,
        )
        if zero_pages_field:
            _ZERO_PAGES.pack_into(buf, 32, self.zero_pages)
        if self.ramblock:
            name = encode_block_name(self.ramblock)
            buf[_RAMBLOCK_AT : _RAMBLOCK_AT + len(name)] = name
        if npages:
            _offsets_struct(npages).pack_into(buf, _OFFSETS_AT, *self.offsets)
        return bytes(buf)


@lru_cache(maxsize=1024)
def _offsets_struct(n: int) -> struct.Struct:
    return struct.Struct(f">{n}Q")


def _block_name(raw: bytes | bytearray | memoryview) -> str:
    name = bytes(raw[:RAMBLOCK_NAME_MAX]).split(b"\0", 1)[0]  # QEMU forces ramblock[255] = 0
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnknownBlock(f"RAM block name {name!r} is not UTF-8") from exc


def nocomp_payload_size(raw_len: int) -> tuple[int, int]:
    """Payload bounds of an uncompressed packet: exactly the pages' bytes."""
    return raw_len, raw_len


@dataclass(frozen=True, slots=True)
class PacketRules:
    """What a receiver accepts: its page size, maximum pages and negotiated method.

    ``payload_size(raw_len)`` gives the (min, max) of next_packet_size for packets whose pages
    hold ``raw_len`` bytes; the compression method supplies it.
    """

    page_size: int = 4096
    max_pages: int = 128
    compression: int = 0
    payload_size: Callable[[int], tuple[int, int]] = nocomp_payload_size
    zero_pages_field: bool = False

    @property
    def header_size(self) -> int:
        return packet_header_size(self.max_pages)


def _refuse_head(magic: int, version: int, flags: int) -> NoReturn:
    """The first of magic, version and flags that is wrong."""
    if magic != MULTIFD_MAGIC:
        raise BadMagic(f"packet magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
    if version != MULTIFD_VERSION:
        raise BadVersion(f"packet version {version}, expected {MULTIFD_VERSION}")
    unknown = flags & ~MULTIFD_KNOWN_FLAGS
    named = [name for bit, name in _LATER_FLAG_NAMES.items() if unknown & bit]
    why = f" ({'; '.join(named)}): not supported" if named else ""
    raise BadFlags(f"unknown flag bits {unknown:#x} in flags {flags:#x}{why}")


def _refuse_page_counts(normal_pages: int, zero_pages: int, pages_alloc: int) -> NoReturn:
    if normal_pages > pages_alloc:
        raise BadNormalPages(f"normal_pages {normal_pages} exceeds pages_alloc {pages_alloc}")
    raise BadNormalPages(
        f"normal_pages {normal_pages} + zero_pages {zero_pages} exceed pages_alloc {pages_alloc}"
    )


def _refuse_offsets(offsets: Sequence[int], name: str, size: int, page_size: int) -> NoReturn:
    last, mask = size - page_size, page_size - 1
    bad = next(off for off in offsets if off > last or off & mask)
    why = "is not page-aligned" if bad & mask else f"is outside the block ({size} bytes)"
    raise BadOffset(f"offset {bad:#x} in block {name!r} {why}")


def _refuse_payload_size(next_size: int, normal_pages: int, low: int, high: int) -> NoReturn:
    want = f"{low}" if low == high else f"{low}..{high}"
    raise BadPacketSize(f"next_packet_size {next_size} for {normal_pages} pages, expected {want}")


def _packet_block(
    buf: bytes | bytearray | memoryview, flags: int, normal_pages: int, rules: PacketRules
) -> str:
    """The block a packet with pages names; its pages' compression must be the negotiated one."""
    if normal_pages and compression_value(flags) != rules.compression:
        raise CompressionMismatch(
            f"packet compression {compression_value(flags)} (flags {flags:#x}), "
            f"negotiated {rules.compression}"
        )
    return _block_name(memoryview(buf)[_RAMBLOCK_AT : _RAMBLOCK_AT + RAMBLOCK_NAME_FIELD])


def decode_packet(
    buf: bytes | bytearray | memoryview,
    rules: PacketRules,
    blocks: Mapping[str, int],
) -> MultiFDPacket:
    """Decode and validate a packet header (``rules.header_size`` bytes).

    ``blocks`` maps each known RAM block name to its size in bytes. Raises a ProtocolError
    subclass naming the first rule broken. Left-overs QEMU does not clear (offsets past the
    packet's pages; block name and size of a page-less packet) are ignored, as QEMU does.
    """
    if len(buf) != rules.header_size:
        raise BadPacketSize(f"packet header is {len(buf)} bytes, expected {rules.header_size}")
    magic, version, flags, pages_alloc, normal_pages, next_size, packet_num = _HEAD.unpack_from(
        buf, 0
    )
    if magic != MULTIFD_MAGIC or version != MULTIFD_VERSION or flags & ~MULTIFD_KNOWN_FLAGS:
        _refuse_head(magic, version, flags)
    if pages_alloc > rules.max_pages:
        raise BadPagesAlloc(f"pages_alloc {pages_alloc} exceeds this side's {rules.max_pages}")
    zero_pages = _ZERO_PAGES.unpack_from(buf, 32)[0] if rules.zero_pages_field else 0
    npages = normal_pages + zero_pages
    if npages > pages_alloc:
        _refuse_page_counts(normal_pages, zero_pages, pages_alloc)
    if npages == 0:
        return MultiFDPacket(flags, pages_alloc, 0, 0, packet_num)
    name = _packet_block(buf, flags, normal_pages, rules)
    size = blocks.get(name)
    if size is None:
        raise UnknownBlock(f"unknown RAM block {name!r}")
    offsets = _offsets_struct(npages).unpack_from(buf, _OFFSETS_AT)
    page_size = rules.page_size
    if max(offsets) > size - page_size or reduce(or_, offsets) & (page_size - 1):
        _refuse_offsets(offsets, name, size, page_size)
    if normal_pages:
        low, high = rules.payload_size(normal_pages * page_size)
        if not low <= next_size <= high:
            _refuse_payload_size(next_size, normal_pages, low, high)
    else:
        next_size = 0
    return MultiFDPacket(
        flags, pages_alloc, normal_pages, next_size, packet_num, name, offsets, zero_pages
    )
