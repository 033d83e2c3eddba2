"""QEMU's values for the main stream (migration/savevm.c, migration/ram.c; 7.2, and what 8.x-10.x
added), our limits, and the byte layouts the writer and the parser share.

The QEMU values are pinned against QEMU's sources by tests/test_mainstream.py.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

# the names the package re-exports; the layouts and name tables are for its modules
__all__ = [
    "MAX_CAPABILITIES",
    "MAX_MACHINE_TYPE",
    "MAX_VMDESC",
    "MIG_CMD_NAMES",
    "MIG_CMD_OPEN_RETURN_PATH",
    "MIG_CMD_PING",
    "MIG_CMD_SWITCHOVER_START",
    "QEMU_FLUSH_PER_ROUND",
    "QEMU_FLUSH_PER_SECTION",
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
    "ZERO_RUN_MAX",
]

# --- QEMU's values ----------------------------------------------------------------------------

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3

# savevm.c's section types
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

# ram.c's record flags, one bit each, in the low bits of a record's be64
RAM_SAVE_FLAG_FULL: Final = 1 << 0  # obsolete, never sent
RAM_SAVE_FLAG_ZERO: Final = 1 << 1
RAM_SAVE_FLAG_MEM_SIZE: Final = 1 << 2
RAM_SAVE_FLAG_PAGE: Final = 1 << 3
RAM_SAVE_FLAG_EOS: Final = 1 << 4
RAM_SAVE_FLAG_CONTINUE: Final = 1 << 5
RAM_SAVE_FLAG_XBZRLE: Final = 1 << 6
RAM_SAVE_FLAG_HOOK: Final = 1 << 7  # RDMA hooks
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 1 << 8
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 1 << 9  # QEMU 8.1+

# savevm.c's enum qemu_vm_cmd: a QEMU_VM_COMMAND is the section byte, be16 command, be16 length,
# then that many bytes. The parser reads MIG_CMD_OPEN_RETURN_PATH and MIG_CMD_PING (a source with
# the return-path capability, after the header), MIG_CMD_PING between the RAM sections too, and
# MIG_CMD_SWITCHOVER_START (QEMU 10.0, machine types 10.0+: "send-switchover-start") between the
# last RAM PART section and the RAM END section.
MIG_CMD_NAMES: Final = {
    0: "MIG_CMD_INVALID",
    1: "MIG_CMD_OPEN_RETURN_PATH",
    2: "MIG_CMD_PING",
    3: "MIG_CMD_POSTCOPY_ADVISE",
    4: "MIG_CMD_POSTCOPY_LISTEN",
    5: "MIG_CMD_POSTCOPY_RUN",
    6: "MIG_CMD_POSTCOPY_RAM_DISCARD",
    7: "MIG_CMD_POSTCOPY_RESUME",
    8: "MIG_CMD_PACKAGED",
    9: "MIG_CMD_ENABLE_COLO",
    10: "MIG_CMD_RECV_BITMAP",
    11: "MIG_CMD_SWITCHOVER_START",
}
MIG_CMD_OPEN_RETURN_PATH: Final = 1
MIG_CMD_PING: Final = 2
MIG_CMD_SWITCHOVER_START: Final = 11

# Where a QEMU multifd source syncs its channels (ram.c; the migration property
# "multifd-flush-after-each-section", on for machine types up to 8.0 by hw_compat_8_0): at every
# EOS record ("per-section", QEMU 7.2's only way), or at RAM_SAVE_FLAG_MULTIFD_FLUSH records, one
# at the setup, one per pass over the dirty pages, one at completion ("per-round", QEMU 8.1+
# with machine types 8.1+).
QEMU_FLUSH_PER_SECTION: Final = "per-section"
QEMU_FLUSH_PER_ROUND: Final = "per-round"

RAM_IDSTR: Final = "ram"
RAM_INSTANCE_ID: Final = 0
RAM_VERSION_ID: Final = 4

SUBSECTION_TARGET_PAGE_BITS: Final = "configuration/target-page-bits"
SUBSECTION_CAPABILITIES: Final = "configuration/capabilities"
SUBSECTION_UUID: Final = "configuration/uuid"

# --- our limits -------------------------------------------------------------------------------

#: Longest machine type name the parser accepts (QEMU's are ~20 bytes).
MAX_MACHINE_TYPE: Final = 256
#: Most capability names in a configuration/capabilities subsection (QEMU 7.2 has ~25 in all).
MAX_CAPABILITIES: Final = 64
#: Largest JSON device description the parser buffers after our own EOF.
MAX_VMDESC: Final = 16 << 20
#: CONTINUE zero records parsed at most per ZeroPages event.
ZERO_RUN_MAX: Final = 65536

# --- names, for messages ----------------------------------------------------------------------


def _names(prefix: str, *, but: tuple[str, ...] = ()) -> dict[int, str]:
    """This module's constants called ``prefix + NAME``, as {value: NAME}, in their order."""
    return {
        value: name.removeprefix(prefix)
        for name, value in globals().items()
        if name.startswith(prefix) and name.removeprefix(prefix) not in but
    }


#: RAM_SAVE_FLAG_* by value (the names without the prefix).
FLAG_NAMES: Final = _names("RAM_SAVE_FLAG_")
#: QEMU_VM_* section types by value (the names without the prefix).
SECTION_NAMES: Final = _names("QEMU_VM_", but=("FILE_MAGIC", "FILE_VERSION"))
_KNOWN_FLAGS: Final = sum(FLAG_NAMES)


def flag_names(flags: int) -> str:
    """``flags`` as ``ZERO|CONTINUE``, unknown bits in hex, ``0`` for none."""
    names = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~_KNOWN_FLAGS
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "0"


def section_name(kind: int) -> str:
    """A section type byte as ``SECTION_PART``, or in hex when unknown."""
    return SECTION_NAMES.get(kind, f"{kind:#04x}")


# --- byte layouts -----------------------------------------------------------------------------

BE64: Final = struct.Struct(">Q")
BE32: Final = struct.Struct(">I")
HEADER: Final = struct.Struct(">II")  # file magic + version
SECTION: Final = struct.Struct(">BI")  # section type + section id (PART, END, footer)
INSTANCE_VERSION: Final = struct.Struct(">II")  # after a START section's idstr
RECORD_FILL: Final = struct.Struct(">QB")  # a CONTINUE zero record: be64 + fill byte
RECORD_DTYPE: Final = np.dtype([("value", ">u8"), ("fill", "u1")])  # the same, as a numpy record
ZERO_CONT: Final = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
EOS_RECORD: Final = BE64.pack(RAM_SAVE_FLAG_EOS)
MAGIC_BYTES: Final = BE32.pack(QEMU_VM_FILE_MAGIC)
COMMAND: Final = struct.Struct(">BHH")  # QEMU_VM_COMMAND, command, length
