"""Sans-I/O writer and incremental parser for the RAM part of QEMU 7.2's migration stream.

The main channel carries QEMU's savevm stream (../shared/WIRE.md, "Main channel, the RAM part"):
the file header, the configuration record, then the "ram" section — a START section with the
block list, PART sections, an END section, each closed by an EOS record and a section footer.
With multifd its only page records are zero pages. What follows the RAM END section (QEMU's
device sections, EOF, the JSON description) is passed through unparsed.

No I/O, no trio: :class:`MainStreamWriter` appends to a buffer you :meth:`~MainStreamWriter.take`;
:class:`MainStreamParser` is fed bytes and hands out events one at a time, like h11.

Facts taken from QEMU's migration/ram.c and savevm.c:

- The source's ``last_sent_block`` (which decides RAM_SAVE_FLAG_CONTINUE) is reset only by
  ``ram_state_reset`` (at setup, and when the RAM block list changes), by the postcopy discard and
  on a postcopy channel switch — not at section boundaries. The destination's
  ``last_recv_block`` is never reset. So a CONTINUE record may refer to the previous section's
  last block; the writer does so and the parser accepts it.
- A record's be64 holds the page offset in the bits above TARGET_PAGE_BITS and the flags below.
- ``ram_load`` accepts only section version 4; the loader checks every section footer's id.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np

from .errors import (
    BadMagic,
    BadOffset,
    BadVersion,
    BlockMismatch,
    ConfigError,
    LimitExceeded,
    MainStreamError,
    MultiFDError,
    TruncatedStream,
    UnknownBlock,
)
from .wire import RAMBLOCK_NAME_MAX, check_page_size, encode_block_name

__all__ = [
    "MAX_CAPABILITIES",
    "MAX_MACHINE_TYPE",
    "MAX_VMDESC",
    "NEED_DATA",
    "QEMU_VM_COMMAND",
    "QEMU_VM_CONFIGURATION",
    "QEMU_VM_EOF",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "QEMU_VM_SECTION_END",
    "QEMU_VM_SECTION_FOOTER",
    "QEMU_VM_SECTION_FULL",
    "QEMU_VM_SECTION_PART",
    "QEMU_VM_SECTION_START",
    "QEMU_VM_SUBSECTION",
    "QEMU_VM_VMDESCRIPTION",
    "RAM_IDSTR",
    "RAM_INSTANCE_ID",
    "RAM_SAVE_FLAG_COMPRESS_PAGE",
    "RAM_SAVE_FLAG_CONTINUE",
    "RAM_SAVE_FLAG_EOS",
    "RAM_SAVE_FLAG_FULL",
    "RAM_SAVE_FLAG_HOOK",
    "RAM_SAVE_FLAG_MEM_SIZE",
    "RAM_SAVE_FLAG_MULTIFD_FLUSH",
    "RAM_SAVE_FLAG_PAGE",
    "RAM_SAVE_FLAG_XBZRLE",
    "RAM_SAVE_FLAG_ZERO",
    "RAM_VERSION_ID",
    "SUBSECTION_CAPABILITIES",
    "SUBSECTION_TARGET_PAGE_BITS",
    "SUBSECTION_UUID",
    "Configuration",
    "ConnectionEnd",
    "DeviceState",
    "Eof",
    "Header",
    "MainEvent",
    "MainStreamParser",
    "MainStreamWriter",
    "NeedData",
    "Page",
    "RamBlocks",
    "RamEnd",
    "RoundEnd",
    "VmDescription",
    "ZeroPage",
    "ZeroPages",
]

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3

QEMU_VM_EOF: Final = 0x00
QEMU_VM_SECTION_START: Final = 0x01
QEMU_VM_SECTION_PART: Final = 0x02
QEMU_VM_SECTION_END: Final = 0x03
QEMU_VM_SECTION_FULL: Final = 0x04
QEMU_VM_SUBSECTION: Final = 0x05
QEMU_VM_VMDESCRIPTION: Final = 0x06
QEMU_VM_CONFIGURATION: Final = 0x07
QEMU_VM_COMMAND: Final = 0x08
QEMU_VM_SECTION_FOOTER: Final = 0x7E

RAM_SAVE_FLAG_FULL: Final = 0x01  # obsolete, never sent
RAM_SAVE_FLAG_ZERO: Final = 0x02
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x04
RAM_SAVE_FLAG_PAGE: Final = 0x08
RAM_SAVE_FLAG_EOS: Final = 0x10
RAM_SAVE_FLAG_CONTINUE: Final = 0x20
RAM_SAVE_FLAG_XBZRLE: Final = 0x40
RAM_SAVE_FLAG_HOOK: Final = 0x80  # RDMA hooks
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200  # QEMU 8.1+

RAM_IDSTR: Final = "ram"
RAM_INSTANCE_ID: Final = 0
RAM_VERSION_ID: Final = 4

#: Longest machine type name the parser accepts (QEMU's are ~20 bytes).
MAX_MACHINE_TYPE: Final = 256
#: Most capability names in a configuration/capabilities subsection (QEMU 7.2 has ~25 in all).
MAX_CAPABILITIES: Final = 64
#: Largest JSON device description the parser buffers after our own EOF.
MAX_VMDESC: Final = 16 << 20

SUBSECTION_TARGET_PAGE_BITS: Final = "configuration/target-page-bits"
SUBSECTION_CAPABILITIES: Final = "configuration/capabilities"
SUBSECTION_UUID: Final = "configuration/uuid"

_FLAG_NAMES: Final = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}
_SECTION_NAMES: Final = {
    QEMU_VM_EOF: "EOF",
    QEMU_VM_SECTION_START: "SECTION_START",
    QEMU_VM_SECTION_PART: "SECTION_PART",
    QEMU_VM_SECTION_END: "SECTION_END",
    QEMU_VM_SECTION_FULL: "SECTION_FULL",
    QEMU_VM_SUBSECTION: "SUBSECTION",
    QEMU_VM_VMDESCRIPTION: "VMDESCRIPTION",
    QEMU_VM_CONFIGURATION: "CONFIGURATION",
    QEMU_VM_COMMAND: "COMMAND",
    QEMU_VM_SECTION_FOOTER: "SECTION_FOOTER",
}

_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")
_HEADER = struct.Struct(">II")
_SECTION = struct.Struct(">BI")  # section type + section id (PART, END, footer)
_RECORD_FILL = struct.Struct(">QB")  # a CONTINUE zero record: be64 + fill byte
_RECORD_DTYPE = np.dtype([("value", ">u8"), ("fill", "u1")])  # the same, as a numpy record
#: CONTINUE zero records parsed at most per ZeroPages event.
ZERO_RUN_MAX = 65536
_INSTANCE_VERSION = struct.Struct(">II")
_ZERO_CONT: Final = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_EOS_RECORD: Final = _BE64.pack(RAM_SAVE_FLAG_EOS)
_MAGIC_BYTES: Final = _BE32.pack(QEMU_VM_FILE_MAGIC)


def _flag_names(flags: int) -> str:
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(_FLAG_NAMES)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "0"


def _section_name(kind: int) -> str:
    return _SECTION_NAMES.get(kind, f"{kind:#04x}")


# --- events ---------------------------------------------------------------------------------


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: Returned by :meth:`MainStreamParser.next_event` when it needs more bytes.
NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Header:
    """The file header: magic and version (always 3)."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """The configuration record: the machine type and the subsections that were present.

    ``subsections`` maps the subsection's name to its value: "configuration/target-page-bits"
    an int, "configuration/capabilities" a tuple of capability names, "configuration/uuid"
    16 bytes.
    """

    machine_type: str
    subsections: dict[str, int | bytes | tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RamBlocks:
    """The RAM START section's block list: (name, size in bytes) in the source's order."""

    blocks: tuple[tuple[str, int], ...]
    section_id: int


@dataclass(frozen=True, slots=True)
class ZeroPage:
    """A RAM_SAVE_FLAG_ZERO record: the page at ``offset`` is ``fill`` repeated."""

    block: str
    offset: int
    fill: int


@dataclass(frozen=True, slots=True, eq=False)
class ZeroPages:
    """A run of CONTINUE zero records of one block (parsers made with ``batch_zero_pages``).

    ``offsets`` (uint64) and ``fills`` (uint8) are arrays of the same length, in stream order;
    the run stands for one ZeroPage event per element.
    """

    block: str
    offsets: np.ndarray[Any, np.dtype[np.uint64]]
    fills: np.ndarray[Any, np.dtype[np.uint8]]

    def expand(self) -> list[ZeroPage]:
        """The same records as single ZeroPage events."""
        return [
            ZeroPage(self.block, off, fill)
            for off, fill in zip(self.offsets.tolist(), self.fills.tolist(), strict=True)
        ]


@dataclass(frozen=True, slots=True)
class Page:
    """A RAM_SAVE_FLAG_PAGE record: one whole page inline."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RoundEnd:
    """An EOS record and its section footer: one sync round (wait for every channel's SYNC).

    ``kind`` is the section type that held it (QEMU_VM_SECTION_START / PART / END), ``index``
    counts the RAM section's EOS records from 0.
    """

    kind: int
    index: int


@dataclass(frozen=True, slots=True)
class RamEnd:
    """The RAM END section is complete: no more RAM records follow."""


@dataclass(frozen=True, slots=True)
class Eof:
    """QEMU_VM_EOF right after the RAM END section (our own sources' ending)."""


@dataclass(frozen=True, slots=True)
class VmDescription:
    """The QEMU_VM_VMDESCRIPTION JSON after :class:`Eof`."""

    json: bytes


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Opaque bytes after the RAM END section (QEMU's device sections, EOF, description).

    The chunks, concatenated, are exactly the stream's bytes from there to its end.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionEnd:
    """The input ended at a place where the stream may end."""


MainEvent: TypeAlias = (
    Header
    | Configuration
    | RamBlocks
    | ZeroPage
    | ZeroPages
    | Page
    | RoundEnd
    | RamEnd
    | Eof
    | VmDescription
    | DeviceState
    | ConnectionEnd
)


# --- writer ---------------------------------------------------------------------------------


class _WBlock:
    __slots__ = ("prefix", "size")

    def __init__(self, prefix: bytes, size: int) -> None:
        self.prefix = prefix  # u8 length + name
        self.size = size


class MainStreamWriter:
    """Builds the main stream's bytes; :meth:`take` hands them out.

    Call order: :meth:`header`, :meth:`ram_setup`, :meth:`eos`, then any number of
    (:meth:`section_part`, records, :meth:`eos`), then :meth:`section_end`, records, :meth:`eos`,
    and :meth:`eof`. Misuse raises ConfigError.
    """

    def __init__(
        self, *, machine_type: str = "pc-q35-7.2", section_id: int = 2, page_size: int = 4096
    ) -> None:
        check_page_size(page_size)
        if not 0 <= section_id <= 0xFFFFFFFF:
            raise ConfigError(f"section id {section_id} does not fit in 32 bits")
        name = machine_type.encode("utf-8")
        if not 0 < len(name) <= MAX_MACHINE_TYPE:
            raise ConfigError(f"machine type {machine_type!r} must be 1..{MAX_MACHINE_TYPE} bytes")
        self.machine_type = machine_type
        self.section_id = section_id
        self.page_size = page_size
        self._machine = name
        self._mask = page_size - 1
        self._buf = bytearray()
        self._blocks: dict[str, _WBlock] = {}
        self._setup_done = False
        self._ram_ended = False
        self._in_section = False
        # QEMU's last_sent_block: reset by ram_setup (ram_state_reset), kept across sections.
        self._last_block: str | None = None

    # -- buffer

    def take(self) -> bytes:
        """Return and clear the buffered bytes."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def pending(self) -> int:
        """Bytes buffered and not yet taken."""
        return len(self._buf)

    # -- structure

    def header(self) -> None:
        """File magic and version, then the configuration record with the machine type."""
        self._buf += _HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
        self._buf.append(QEMU_VM_CONFIGURATION)
        self._buf += _BE32.pack(len(self._machine))
        self._buf += self._machine

    def ram_setup(self, blocks: Sequence[tuple[str, int]]) -> None:
        """The RAM START section header and block list (the caller then syncs and calls eos)."""
        if self._setup_done:
            raise ConfigError("ram_setup called twice")
        table: dict[str, _WBlock] = {}
        body = bytearray()
        total = 0
        for name, size in blocks:
            raw = encode_block_name(name)
            if name in table:
                raise ConfigError(f"RAM block {name!r} listed twice")
            if size <= 0 or size & self._mask:
                raise ConfigError(
                    f"RAM block {name!r} size {size} is not a positive multiple of "
                    f"the page size {self.page_size}"
                )
            prefix = bytes((len(raw),)) + raw
            table[name] = _WBlock(prefix, size)
            body += prefix
            body += _BE64.pack(size)
            total += size
        if total >= 1 << 64:
            raise ConfigError(f"RAM blocks total {total} bytes, more than 64 bits hold")
        self._write_section_start()
        self._buf += _BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)
        self._buf += body
        self._blocks = table
        self._setup_done = True
        self._in_section = True
        self._last_block = None

    def _write_section_start(self) -> None:
        idstr = RAM_IDSTR.encode()
        self._buf += _SECTION.pack(QEMU_VM_SECTION_START, self.section_id)
        self._buf.append(len(idstr))
        self._buf += idstr
        self._buf += _INSTANCE_VERSION.pack(RAM_INSTANCE_ID, RAM_VERSION_ID)

    def section_part(self) -> None:
        """Open a RAM PART section (one iteration round)."""
        self._open_section(QEMU_VM_SECTION_PART)

    def section_end(self) -> None:
        """Open the RAM END section (the last round)."""
        self._open_section(QEMU_VM_SECTION_END)
        self._ram_ended = True

    def _open_section(self, kind: int) -> None:
        if not self._setup_done or self._ram_ended:
            raise ConfigError(f"{_section_name(kind)} outside the RAM section's life")
        if self._in_section:
            raise ConfigError(f"{_section_name(kind)} before the previous section's eos")
        self._buf += _SECTION.pack(kind, self.section_id)
        self._in_section = True

    def eos(self) -> None:
        """Close the current RAM section: the EOS record and the section footer."""
        if not self._in_section:
            raise ConfigError("eos outside a RAM section")
        self._buf += _EOS_RECORD
        self._buf += _SECTION.pack(QEMU_VM_SECTION_FOOTER, self.section_id)
        self._in_section = False

    def eof(self) -> None:
        """QEMU_VM_EOF: the end of the stream (after the RAM END section)."""
        if not self._ram_ended or self._in_section:
            raise ConfigError("eof before the RAM END section was closed")
        self._buf.append(QEMU_VM_EOF)
        self._eof_written = True

    def vmdesc(self, data: bytes) -> None:
        """QEMU_VM_VMDESCRIPTION after EOF: be32 length + JSON (QEMU's device description)."""
        if not getattr(self, "_eof_written", False):
            raise ConfigError("the VM description comes after eof")
        if len(data) > MAX_VMDESC:
            raise ConfigError(f"VM description of {len(data)} bytes exceeds {MAX_VMDESC}")
        self._buf.append(QEMU_VM_VMDESCRIPTION)
        self._buf += _BE32.pack(len(data))
        self._buf += data

    # -- records

    def _check(self, block: str, offset: int) -> _WBlock:
        info = self._blocks.get(block)
        if info is None:
            raise ConfigError(f"unknown RAM block {block!r}")
        if offset & self._mask or not 0 <= offset < info.size:
            raise ConfigError(f"offset {offset:#x} is not a page of block {block!r}")
        if not self._in_section:
            raise ConfigError("page record outside a RAM section")
        return info

    def zero_page(self, block: str, offset: int, fill: int = 0) -> None:
        """A zero-page record: the page at ``offset`` of ``block`` is ``fill`` repeated."""
        info = self._check(block, offset)
        if not 0 <= fill <= 0xFF:
            raise ConfigError(f"fill byte {fill} outside 0..255")
        if block == self._last_block:
            self._buf += _RECORD_FILL.pack(offset | _ZERO_CONT, fill)
        else:
            self._buf += _BE64.pack(offset | RAM_SAVE_FLAG_ZERO)
            self._buf += info.prefix
            self._buf.append(fill)
            self._last_block = block

    def zero_pages(self, block: str, offsets: Iterable[int], fill: int = 0) -> None:
        """Zero-page records for many pages of one block (same bytes as zero_page each)."""
        info = self._blocks.get(block)
        if info is None:
            raise ConfigError(f"unknown RAM block {block!r}")
        if not self._in_section:
            raise ConfigError("page record outside a RAM section")
        if not 0 <= fill <= 0xFF:
            raise ConfigError(f"fill byte {fill} outside 0..255")
        try:
            offs = np.asarray(
                offsets if isinstance(offsets, np.ndarray) else list(offsets), dtype=np.int64
            )
        except (OverflowError, ValueError, TypeError) as exc:
            raise ConfigError(f"bad page offsets for block {block!r}: {exc}") from None
        if not len(offs):
            return
        bad = (offs & self._mask).astype(bool) | (offs < 0) | (offs >= info.size)
        if bad.any():
            off = int(offs[int(np.argmax(bad))])
            raise ConfigError(f"offset {off:#x} is not a page of block {block!r}")
        if block != self._last_block:
            self._buf += _BE64.pack(int(offs[0]) | RAM_SAVE_FLAG_ZERO)
            self._buf += info.prefix
            self._buf.append(fill)
            self._last_block = block
            offs = offs[1:]
        if len(offs):
            records = np.empty(len(offs), dtype=_RECORD_DTYPE)
            records["value"] = offs.astype(np.uint64) | np.uint64(_ZERO_CONT)
            records["fill"] = fill
            self._buf += records.tobytes()

    def page(self, block: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A page record: the page's bytes inline (QEMU without multifd)."""
        info = self._check(block, offset)
        if len(data) != self.page_size:
            raise ConfigError(f"page data is {len(data)} bytes, expected {self.page_size}")
        if block == self._last_block:
            self._buf += _BE64.pack(offset | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)
        else:
            self._buf += _BE64.pack(offset | RAM_SAVE_FLAG_PAGE)
            self._buf += info.prefix
            self._last_block = block
        self._buf += data


# --- parser ---------------------------------------------------------------------------------


class _PBlock:
    __slots__ = ("last", "name", "size")

    def __init__(self, name: str, size: int, page_size: int) -> None:
        self.name = name
        self.size = size
        self.last = size - page_size  # the highest valid page offset


_Step: TypeAlias = "MainEvent | NeedData | None"


class MainStreamParser:
    """Incremental parser: :meth:`feed` bytes, :meth:`feed_eof` at the end, then
    :meth:`next_event` until it returns :data:`NEED_DATA` (or :class:`ConnectionEnd`).

    Every malformed input raises a :class:`~multifd_core.errors.ProtocolError` subclass; after
    one, the parser stays failed and raises it again.
    """

    def __init__(
        self,
        *,
        page_size: int = 4096,
        max_blocks: int = 4096,
        max_device_state: int | None = None,
        batch_zero_pages: bool = False,
    ) -> None:
        """``batch_zero_pages``: runs of CONTINUE zero records come as one ZeroPages event
        (parsed in C) instead of one ZeroPage event each."""
        check_page_size(page_size)
        if max_blocks < 0:
            raise ConfigError(f"max_blocks {max_blocks} is negative")
        if max_device_state is not None and max_device_state < 0:
            raise ConfigError(f"max_device_state {max_device_state} is negative")
        self.page_size = page_size
        self.max_blocks = max_blocks
        self.max_device_state = max_device_state
        self.batch_zero_pages = batch_zero_pages
        self._mask = page_size - 1
        self._page = struct.Struct(f"{page_size}s")
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._failed: MultiFDError | None = None
        self._pending: deque[MainEvent] = deque()
        self._step = self._header
        # RAM section state
        self.section_id: int | None = None
        self.blocks: tuple[tuple[str, int], ...] = ()
        self._by_raw: dict[bytes, _PBlock] = {}
        self._setup: list[tuple[str, int]] = []
        self._setup_left = 0
        self._kind = QEMU_VM_SECTION_START
        self._round = 0
        self._last: _PBlock | None = None  # QEMU's last_recv_block
        self._device_bytes = 0

    # -- input

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer."""
        if self._eof:
            raise ConfigError("feed after feed_eof")
        if not data:
            return
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= 1 << 16 and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def feed_eof(self) -> None:
        """The peer closed the stream: no more bytes will come."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet parsed."""
        return len(self._buf) - self._pos

    # -- output

    def next_event(self) -> MainEvent | NeedData:
        """The next event, or NEED_DATA when more bytes are needed to produce one."""
        if self._failed is not None:
            raise self._failed
        if self._pending:
            return self._pending.popleft()
        try:
            while True:
                ev = self._step()
                if ev is not None:
                    break
            if ev is NEED_DATA and self._eof:
                raise TruncatedStream(
                    f"main stream truncated {self._where()} "
                    f"({len(self._buf) - self._pos} bytes left unparsed)"
                )
        except MultiFDError as exc:
            self._failed = exc
            raise
        return ev

    def _where(self) -> str:
        name = getattr(self._step, "__name__", "?").strip("_").replace("_", " ")
        return f"in {name}"

    # -- states: each returns an event, NEED_DATA, or None after changing state

    def _header(self) -> _Step:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 8:
            have = bytes(buf[pos : pos + min(avail, 4)])
            if not _MAGIC_BYTES.startswith(have):
                raise BadMagic(f"main stream starts with {have!r}, not QEMU_VM_FILE_MAGIC")
            return NEED_DATA
        magic, version = _HEADER.unpack_from(buf, pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadMagic(f"main stream magic {magic:#010x}, expected {QEMU_VM_FILE_MAGIC:#010x}")
        if version != QEMU_VM_FILE_VERSION:
            raise BadVersion(f"main stream version {version}, expected {QEMU_VM_FILE_VERSION}")
        self._pos = pos + 8
        self._step = self._after_header
        return Header(version)

    def _after_header(self) -> _Step:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 1:
            return NEED_DATA
        if buf[pos] != QEMU_VM_CONFIGURATION:
            self._step = self._setup_section  # the configuration is optional (old machines)
            return None
        parsed = self._parse_configuration(pos + 1)
        if parsed is None:
            return NEED_DATA
        event, end = parsed
        self._pos = end
        self._step = self._setup_section
        return event

    def _parse_configuration(self, p: int) -> tuple[Configuration, int] | None:
        """The configuration vmstate from ``p``; None if it is not all buffered yet.

        Its end is only known from the byte after it (a subsection or not), so that byte must
        be buffered too.
        """
        buf = self._buf
        end = len(buf)
        if end - p < 4:
            return None
        (length,) = _BE32.unpack_from(buf, p)
        if not 0 < length <= MAX_MACHINE_TYPE:
            raise MainStreamError(
                f"configuration machine type length {length} outside 1..{MAX_MACHINE_TYPE}"
            )
        p += 4
        if end - p < length:
            return None
        machine = _decode(bytes(buf[p : p + length]), "machine type")
        p += length
        subsections: dict[str, int | bytes | tuple[str, ...]] = {}
        while True:
            if end - p < 1:
                return None
            if buf[p] != QEMU_VM_SUBSECTION:
                break
            if end - p < 2:
                return None
            nlen = buf[p + 1]
            if end - p < 2 + nlen + 4:
                return None
            name = _decode(bytes(buf[p + 2 : p + 2 + nlen]), "subsection name")
            (version,) = _BE32.unpack_from(buf, p + 2 + nlen)
            p += 2 + nlen + 4
            if name not in (SUBSECTION_TARGET_PAGE_BITS, SUBSECTION_CAPABILITIES, SUBSECTION_UUID):
                raise MainStreamError(f"unknown configuration subsection {name!r}")
            if name in subsections:
                raise MainStreamError(f"configuration subsection {name!r} appears twice")
            if version != 1:
                raise MainStreamError(f"configuration subsection {name!r} version {version}, not 1")
            if name == SUBSECTION_TARGET_PAGE_BITS:
                if end - p < 4:
                    return None
                (bits,) = _BE32.unpack_from(buf, p)
                p += 4
                if bits >= 64 or 1 << bits != self.page_size:
                    raise MainStreamError(
                        f"source target page bits {bits}, but the page size here is "
                        f"{self.page_size}"
                    )
                subsections[name] = bits
            elif name == SUBSECTION_UUID:
                if end - p < 16:
                    return None
                subsections[name] = bytes(buf[p : p + 16])
                p += 16
            else:
                if end - p < 4:
                    return None
                (count,) = _BE32.unpack_from(buf, p)
                p += 4
                if count > MAX_CAPABILITIES:
                    raise MainStreamError(
                        f"configuration lists {count} capabilities, more than {MAX_CAPABILITIES}"
                    )
                caps: list[str] = []
                for _ in range(count):
                    if end - p < 1:
                        return None
                    clen = buf[p]
                    if end - p < 1 + clen:
                        return None
                    caps.append(_decode(bytes(buf[p + 1 : p + 1 + clen]), "capability name"))
                    p += 1 + clen
                if "x-ignore-shared" in caps:
                    raise MainStreamError(
                        "capability x-ignore-shared is not supported (it changes the block list)"
                    )
                subsections[name] = tuple(caps)
        return Configuration(machine, subsections), p

    def _setup_section(self) -> _Step:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 1:
            return NEED_DATA
        kind = buf[pos]
        if kind != QEMU_VM_SECTION_START:
            self._unexpected_section(kind, "the RAM START section")
        if avail < 6:
            return NEED_DATA
        (section_id,) = _BE32.unpack_from(buf, pos + 1)
        nlen = buf[pos + 5]
        if avail < 6 + nlen + 8:
            return NEED_DATA
        idstr = bytes(buf[pos + 6 : pos + 6 + nlen])
        if idstr != b"ram":
            raise MainStreamError(
                f"section {idstr!r} (id {section_id}) started before the RAM section; "
                "only 'ram' is supported there"
            )
        instance, version = _INSTANCE_VERSION.unpack_from(buf, pos + 6 + nlen)
        if instance != RAM_INSTANCE_ID:
            raise MainStreamError(f"RAM section instance {instance}, expected {RAM_INSTANCE_ID}")
        if version != RAM_VERSION_ID:
            raise BadVersion(f"RAM section version {version}, expected {RAM_VERSION_ID}")
        self._pos = pos + 6 + nlen + 8
        self.section_id = section_id
        self._kind = QEMU_VM_SECTION_START
        self._step = self._mem_size
        return None

    def _unexpected_section(self, kind: int, expected: str) -> None:
        if kind == QEMU_VM_COMMAND:
            raise MainStreamError(f"QEMU_VM_COMMAND where {expected} was expected: unsupported")
        if kind == QEMU_VM_EOF:
            raise MainStreamError(f"QEMU_VM_EOF where {expected} was expected")
        if kind in _SECTION_NAMES:
            raise MainStreamError(f"{_section_name(kind)} where {expected} was expected")
        raise MainStreamError(f"unknown section type {kind:#04x} where {expected} was expected")

    def _mem_size(self) -> _Step:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 8:
            return NEED_DATA
        (value,) = _BE64.unpack_from(buf, pos)
        flags = value & self._mask
        if flags != RAM_SAVE_FLAG_MEM_SIZE:
            raise MainStreamError(
                f"RAM START section begins with a {_flag_names(flags)} record, not MEM_SIZE"
            )
        self._pos = pos + 8
        self._setup_left = value - flags
        self._setup = []
        self._step = self._block_entry
        return None

    def _block_entry(self) -> _Step:
        if self._setup_left == 0:
            return self._blocks_done()
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 1:
            return NEED_DATA
        nlen = buf[pos]
        if nlen == 0:
            raise BlockMismatch("RAM block with an empty name in the block list")
        if avail < 1 + nlen + 8:
            return NEED_DATA
        raw = bytes(buf[pos + 1 : pos + 1 + nlen])
        (size,) = _BE64.unpack_from(buf, pos + 1 + nlen)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BlockMismatch(f"RAM block name {raw!r} is not UTF-8") from None
        if b"\0" in raw or len(raw) > RAMBLOCK_NAME_MAX:
            raise BlockMismatch(f"RAM block name {raw!r} is not a valid name")
        if raw in self._by_raw:
            raise BlockMismatch(f"RAM block {name!r} listed twice")
        if size == 0 or size & self._mask:
            raise BlockMismatch(
                f"RAM block {name!r} size {size} is not a positive multiple of "
                f"the page size {self.page_size}"
            )
        if size > self._setup_left:
            raise BlockMismatch(
                f"RAM block {name!r} size {size} exceeds the {self._setup_left} bytes left "
                "of the announced total"
            )
        if len(self._setup) >= self.max_blocks:
            raise LimitExceeded(f"the source announces more than {self.max_blocks} RAM blocks")
        self._pos = pos + 1 + nlen + 8
        self._setup.append((name, size))
        self._by_raw[raw] = _PBlock(name, size, self.page_size)
        self._setup_left -= size
        return None

    def _blocks_done(self) -> _Step:
        self.blocks = tuple(self._setup)
        self._setup = []
        self._step = self._records
        assert self.section_id is not None
        return RamBlocks(self.blocks, self.section_id)

    def _records(self) -> _Step:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 8:
            return NEED_DATA
        (value,) = _BE64.unpack_from(buf, pos)
        flags = value & self._mask
        offset = value - flags
        if flags == _ZERO_CONT:  # the common case: a zero page of the previous record's block
            if avail < 9:
                return NEED_DATA
            block = self._last
            if block is None:
                raise MainStreamError("CONTINUE record with no previous block")
            if offset > block.last:
                raise BadOffset(f"offset {offset:#x} is outside block {block.name!r}")
            if self.batch_zero_pages and avail >= 18:
                return self._zero_run(block)
            self._pos = pos + 9
            return ZeroPage(block.name, offset, buf[pos + 8])
        base = flags & ~RAM_SAVE_FLAG_CONTINUE
        if base == RAM_SAVE_FLAG_EOS:
            return self._eos(flags, offset)
        if base != RAM_SAVE_FLAG_ZERO and base != RAM_SAVE_FLAG_PAGE:
            self._bad_flags(flags)
        p = pos + 8
        if flags & RAM_SAVE_FLAG_CONTINUE:
            block = self._last
            if block is None:
                raise MainStreamError(
                    f"CONTINUE record ({_flag_names(flags)}) with no previous block"
                )
        else:
            if avail < 9:
                return NEED_DATA
            nlen = buf[p]
            if avail < 9 + nlen:
                return NEED_DATA
            raw = bytes(buf[p + 1 : p + 1 + nlen])
            found = self._by_raw.get(raw)
            if found is None:
                shown = raw.decode("utf-8", "replace")
                raise UnknownBlock(f"{_flag_names(flags)} record for unknown RAM block {shown!r}")
            block = found
            p += 1 + nlen
        if offset > block.last:
            raise BadOffset(
                f"offset {offset:#x} is outside block {block.name!r} ({block.size} bytes)"
            )
        if base == RAM_SAVE_FLAG_ZERO:
            if len(buf) - p < 1:
                return NEED_DATA
            self._pos = p + 1
            self._last = block
            return ZeroPage(block.name, offset, buf[p])
        if len(buf) - p < self.page_size:
            return NEED_DATA
        (data,) = self._page.unpack_from(buf, p)
        self._pos = p + self.page_size
        self._last = block
        return Page(block.name, offset, data)

    def _zero_run(self, block: _PBlock) -> ZeroPages:
        """The buffered run of CONTINUE zero records at ``_pos`` (at least one), as one event."""
        pos = self._pos
        n = min((len(self._buf) - pos) // 9, ZERO_RUN_MAX)
        records = np.frombuffer(self._buf, dtype=_RECORD_DTYPE, count=n, offset=pos)
        values = records["value"].astype(np.uint64)
        fills = records["fill"].copy()
        del records  # no view of the buffer may outlive this call: feed() resizes it
        mask = np.uint64(self._mask)
        same = (values & mask) == np.uint64(_ZERO_CONT)
        if not same.all():
            n = int(np.argmin(same))  # the first record of another kind ends the run
            values, fills = values[:n], fills[:n]
        offsets = values & ~mask
        outside = offsets > np.uint64(block.last)
        if outside.any():
            first = int(np.argmax(outside))
            if first:  # the good records before it still count, as they would one by one
                n, offsets, fills = first, offsets[:first], fills[:first]
            else:
                raise BadOffset(f"offset {int(offsets[0]):#x} is outside block {block.name!r}")
        self._pos = pos + 9 * n
        return ZeroPages(block.name, offsets, fills)

    def _bad_flags(self, flags: int) -> None:
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            raise MainStreamError(
                f"MEM_SIZE record ({_flag_names(flags)}) outside the RAM START section's head"
            )
        unsupported = flags & (
            RAM_SAVE_FLAG_XBZRLE
            | RAM_SAVE_FLAG_COMPRESS_PAGE
            | RAM_SAVE_FLAG_MULTIFD_FLUSH
            | RAM_SAVE_FLAG_HOOK
            | RAM_SAVE_FLAG_FULL
        )
        if unsupported:
            raise MainStreamError(
                f"unsupported RAM record flag {_flag_names(unsupported)} "
                f"(record flags {_flag_names(flags)})"
            )
        raise MainStreamError(f"bad RAM record flags {flags:#x} ({_flag_names(flags)})")

    def _eos(self, flags: int, offset: int) -> _Step:
        if flags != RAM_SAVE_FLAG_EOS or offset:
            raise MainStreamError(f"bad EOS record: offset {offset:#x}, {_flag_names(flags)}")
        # The round ends at the EOS record itself, not at the section footer after it: QEMU 7.2
        # flushes its stream right after the EOS but writes the footer into its buffer, where it
        # can stay while the source blocks on full multifd channels (their SYNC is in, so they
        # wait for this round end). QEMU's own loader syncs on reading the EOS.
        self._pos += 8
        event = RoundEnd(self._kind, self._round)
        self._round += 1
        self._step = self._footer
        return event

    def _footer(self) -> _Step:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return NEED_DATA
        marker, section_id = _SECTION.unpack_from(buf, pos)
        if marker != QEMU_VM_SECTION_FOOTER:
            raise MainStreamError(
                f"missing section footer after the RAM EOS: byte {marker:#04x}, expected "
                f"{QEMU_VM_SECTION_FOOTER:#04x}"
            )
        if section_id != self.section_id:
            raise MainStreamError(
                f"section footer id {section_id} does not match the RAM section id "
                f"{self.section_id}"
            )
        self._pos = pos + 5
        if self._kind == QEMU_VM_SECTION_END:
            self._step = self._after_ram
            return RamEnd()
        self._step = self._next_section
        return None

    def _next_section(self) -> _Step:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 1:
            return NEED_DATA
        kind = buf[pos]
        if kind != QEMU_VM_SECTION_PART and kind != QEMU_VM_SECTION_END:
            self._unexpected_section(kind, "a RAM PART or END section")
        if avail < 5:
            return NEED_DATA
        (section_id,) = _BE32.unpack_from(buf, pos + 1)
        if section_id != self.section_id:
            raise MainStreamError(
                f"{_section_name(kind)} for section id {section_id} before the RAM section "
                f"(id {self.section_id}) ended"
            )
        self._pos = pos + 5
        self._kind = kind
        self._step = self._records
        return None

    def _after_ram(self) -> _Step:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 1:
            return NEED_DATA
        if buf[pos] == QEMU_VM_EOF:
            self._pos = pos + 1
            self._step = self._after_eof
            return Eof()
        self._step = self._device_state
        return None

    def _after_eof(self) -> _Step:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 1:
            return ConnectionEnd() if self._eof else NEED_DATA
        if buf[pos] != QEMU_VM_VMDESCRIPTION:
            raise MainStreamError(
                f"{_section_name(buf[pos])} after QEMU_VM_EOF; only a VMDESCRIPTION may follow"
            )
        if avail < 5:
            return NEED_DATA
        (length,) = _BE32.unpack_from(buf, pos + 1)
        limit = MAX_VMDESC
        if self.max_device_state is not None:
            limit = min(limit, self.max_device_state)
        if length > limit:
            raise MainStreamError(f"VM description of {length} bytes exceeds the {limit} allowed")
        if avail < 5 + length:
            return NEED_DATA
        self._pos = pos + 5 + length
        self._step = self._done
        return VmDescription(bytes(buf[pos + 5 : pos + 5 + length]))

    def _done(self) -> _Step:
        if len(self._buf) - self._pos:
            raise MainStreamError("bytes after the VM description")
        return ConnectionEnd() if self._eof else NEED_DATA

    def _device_state(self) -> _Step:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail == 0:
            return ConnectionEnd() if self._eof else NEED_DATA
        total = self._device_bytes + avail
        if self.max_device_state is not None and total > self.max_device_state:
            raise MainStreamError(
                f"device state after the RAM section exceeds {self.max_device_state} bytes"
            )
        self._device_bytes = total
        data = bytes(buf[pos:])
        self._pos = len(buf)
        return DeviceState(data)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MainStreamError(f"{what} {raw!r} is not UTF-8") from None
