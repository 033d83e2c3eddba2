"""The main stream's bytes, as a QEMU source with multifd writes them (7.2; newer machine
types add the MULTIFD_FLUSH record, :meth:`MainStreamWriter.multifd_flush`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import ConfigError
from ..wire import check_page_size, encode_block_name
from .constants import (
    BE32,
    BE64,
    COMMAND,
    EOS_RECORD,
    HEADER,
    INSTANCE_VERSION,
    MAX_MACHINE_TYPE,
    MAX_VMDESC,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PING,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_VMDESCRIPTION,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    RAM_VERSION_ID,
    RECORD_DTYPE,
    RECORD_FILL,
    SECTION,
    ZERO_CONT,
    section_name,
)

__all__ = ["MainStreamWriter"]


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
        self._eof_written = False
        self._return_path = False
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
        self._buf += HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)
        self._buf.append(QEMU_VM_CONFIGURATION)
        self._buf += BE32.pack(len(self._machine))
        self._buf += self._machine

    def open_return_path(self) -> None:
        """MIG_CMD_OPEN_RETURN_PATH, then MIG_CMD_PING 1, as a QEMU source with the return-path
        capability writes them after the header (before the RAM START section)."""
        if self._setup_done or self._return_path:
            raise ConfigError("open_return_path comes once, between header and ram_setup")
        self._buf += COMMAND.pack(QEMU_VM_COMMAND, MIG_CMD_OPEN_RETURN_PATH, 0)
        self._return_path = True
        self.ping(1)

    def ping(self, value: int) -> None:
        """MIG_CMD_PING ``value`` (be32): the destination answers with a PONG of the same value
        once it has read the stream up to here. After ``open_return_path``, outside a RAM
        section."""
        if not self._return_path or self._in_section:
            raise ConfigError("ping needs an open return path and no RAM section open")
        self._buf += COMMAND.pack(QEMU_VM_COMMAND, MIG_CMD_PING, 4) + BE32.pack(value)

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
            body += BE64.pack(size)
            total += size
        if total >= 1 << 64:
            raise ConfigError(f"RAM blocks total {total} bytes, more than 64 bits hold")
        self._write_section_start()
        self._buf += BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)
        self._buf += body
        self._blocks = table
        self._setup_done = True
        self._in_section = True
        self._last_block = None

    def _write_section_start(self) -> None:
        idstr = RAM_IDSTR.encode()
        self._buf += SECTION.pack(QEMU_VM_SECTION_START, self.section_id)
        self._buf.append(len(idstr))
        self._buf += idstr
        self._buf += INSTANCE_VERSION.pack(RAM_INSTANCE_ID, RAM_VERSION_ID)

    def section_part(self) -> None:
        """Open a RAM PART section (one iteration round)."""
        self._open_section(QEMU_VM_SECTION_PART)

    def section_end(self) -> None:
        """Open the RAM END section (the last round)."""
        self._open_section(QEMU_VM_SECTION_END)
        self._ram_ended = True

    def _open_section(self, kind: int) -> None:
        if not self._setup_done or self._ram_ended:
            raise ConfigError(f"{section_name(kind)} outside the RAM section's life")
        if self._in_section:
            raise ConfigError(f"{section_name(kind)} before the previous section's eos")
        self._buf += SECTION.pack(kind, self.section_id)
        self._in_section = True

    def eos(self) -> None:
        """Close the current RAM section: the EOS record and the section footer."""
        if not self._in_section:
            raise ConfigError("eos outside a RAM section")
        self._buf += EOS_RECORD
        self._buf += SECTION.pack(QEMU_VM_SECTION_FOOTER, self.section_id)
        self._in_section = False

    def multifd_flush(self) -> None:
        """RAM_SAVE_FLAG_MULTIFD_FLUSH (QEMU 8.1+ machine types): the destination syncs its
        channels here, after the SYNC packets of a round, instead of at each EOS."""
        if not self._in_section:
            raise ConfigError("multifd flush outside a RAM section")
        self._buf += BE64.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)

    def eof(self) -> None:
        """QEMU_VM_EOF: the end of the stream (after the RAM END section)."""
        if not self._ram_ended or self._in_section:
            raise ConfigError("eof before the RAM END section was closed")
        self._buf.append(QEMU_VM_EOF)
        self._eof_written = True

    def vmdesc(self, data: bytes) -> None:
        """QEMU_VM_VMDESCRIPTION after EOF: be32 length + JSON (QEMU's device description)."""
        if not self._eof_written:
            raise ConfigError("the VM description comes after eof")
        if len(data) > MAX_VMDESC:
            raise ConfigError(f"VM description of {len(data)} bytes exceeds {MAX_VMDESC}")
        self._buf.append(QEMU_VM_VMDESCRIPTION)
        self._buf += BE32.pack(len(data))
        self._buf += data

    # -- records

    def _record_block(self, block: str, offset: int | None, fill: int = 0) -> _WBlock:
        """The block a record may go to now, with ``offset`` (None: checked later) and ``fill``
        (a zero page's fill byte) checked."""
        info = self._blocks.get(block)
        if info is None:
            raise ConfigError(f"unknown RAM block {block!r}")
        if offset is not None:
            self._check_offset(info, block, offset)
        if not self._in_section:
            raise ConfigError("page record outside a RAM section")
        if not 0 <= fill <= 0xFF:
            raise ConfigError(f"fill byte {fill} outside 0..255")
        return info

    def _check_offset(self, info: _WBlock, block: str, offset: int) -> None:
        if offset & self._mask or not 0 <= offset < info.size:
            raise ConfigError(f"offset {offset:#x} is not a page of block {block!r}")

    def _named(self, info: _WBlock, block: str, value: int) -> None:
        """A record that names its block (not CONTINUE): be64, then the block's name."""
        self._buf += BE64.pack(value)
        self._buf += info.prefix
        self._last_block = block

    def zero_page(self, block: str, offset: int, fill: int = 0) -> None:
        """A zero-page record: the page at ``offset`` of ``block`` is ``fill`` repeated."""
        info = self._record_block(block, offset, fill)
        if block == self._last_block:
            self._buf += RECORD_FILL.pack(offset | ZERO_CONT, fill)
        else:
            self._named(info, block, offset | RAM_SAVE_FLAG_ZERO)
            self._buf.append(fill)

    def zero_pages(self, block: str, offsets: Iterable[int], fill: int = 0) -> None:
        """Zero-page records for many pages of one block (same bytes as zero_page each)."""
        info = self._record_block(block, None, fill)
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
            self._check_offset(info, block, int(offs[int(np.argmax(bad))]))
        if block != self._last_block:
            self._named(info, block, int(offs[0]) | RAM_SAVE_FLAG_ZERO)
            self._buf.append(fill)
            offs = offs[1:]
        if len(offs):
            records = np.empty(len(offs), dtype=RECORD_DTYPE)
            records["value"] = offs.astype(np.uint64) | np.uint64(ZERO_CONT)
            records["fill"] = fill
            self._buf += records.tobytes()

    def page(self, block: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A page record: the page's bytes inline (QEMU without multifd)."""
        info = self._record_block(block, offset)
        if len(data) != self.page_size:
            raise ConfigError(f"page data is {len(data)} bytes, expected {self.page_size}")
        if block == self._last_block:
            self._buf += BE64.pack(offset | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)
        else:
            self._named(info, block, offset | RAM_SAVE_FLAG_PAGE)
        self._buf += data
