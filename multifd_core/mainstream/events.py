"""What :class:`~multifd_core.mainstream.MainStreamParser` hands out: one event per part of the
stream, and :data:`NEED_DATA` when it needs more bytes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np

__all__ = [
    "NEED_DATA",
    "Command",
    "Configuration",
    "ConnectionEnd",
    "DeviceState",
    "Eof",
    "Header",
    "MainEvent",
    "NeedData",
    "Page",
    "RamBlocks",
    "RamEnd",
    "RoundEnd",
    "StreamComplete",
    "VmDescription",
    "ZeroPage",
    "ZeroPages",
]


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
class Command:
    """A QEMU_VM_COMMAND between the RAM sections (QEMU 10.0: MIG_CMD_SWITCHOVER_START before
    the RAM END section): savevm.c's command number and its bytes."""

    command: int
    data: bytes = b""


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
class StreamComplete:
    """With a return path open: the source's stream is complete (its device state ended with
    the VM description) though its connection stays open; the source now waits for the
    destination's SHUT. Only the end of the input (:class:`ConnectionEnd`) may follow."""


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
    | Command
    | RamEnd
    | Eof
    | VmDescription
    | DeviceState
    | StreamComplete
    | ConnectionEnd
)
