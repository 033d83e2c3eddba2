"""State handlers for the RAM section's framing: the START section's header (or a QEMU_VM_COMMAND
of :data:`COMMANDS_BEFORE_RAM` before it), the footer after each EOS, and the header of the PART
or END section that follows (or a QEMU_VM_COMMAND of :data:`COMMANDS_BETWEEN_SECTIONS` before
it)."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Final, NoReturn

from ..errors import BadVersion, MainStreamError
from .constants import (
    BE32,
    COMMAND,
    INSTANCE_VERSION,
    MIG_CMD_NAMES,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PING,
    MIG_CMD_SWITCHOVER_START,
    QEMU_VM_COMMAND,
    QEMU_VM_EOF,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    SECTION,
    SECTION_NAMES,
    section_name,
)
from .events import NEED_DATA, Command, RamEnd
from .states import ParseContext, State, Step

_RAM_IDSTR: Final = RAM_IDSTR.encode()
_START: Final = frozenset({QEMU_VM_SECTION_START, QEMU_VM_COMMAND})
_PART_OR_END: Final = frozenset({QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END})
_NEXT: Final = _PART_OR_END | {QEMU_VM_COMMAND}
#: The QEMU_VM_COMMANDs read before the RAM START section (a source with the return-path
#: capability: OPEN_RETURN_PATH, then a PING), and the length of their data.
COMMANDS_BEFORE_RAM: Final = {MIG_CMD_OPEN_RETURN_PATH: 0, MIG_CMD_PING: 4}
#: The QEMU_VM_COMMANDs read between two RAM sections, and the length of their data.
COMMANDS_BETWEEN_SECTIONS: Final = {MIG_CMD_SWITCHOVER_START: 0, MIG_CMD_PING: 4}


def unexpected_section(kind: int, expected: str) -> NoReturn:
    """Refuse section type ``kind`` where ``expected`` must come."""
    if kind == QEMU_VM_COMMAND:
        raise MainStreamError(f"QEMU_VM_COMMAND where {expected} was expected: unsupported")
    if kind == QEMU_VM_EOF:
        raise MainStreamError(f"QEMU_VM_EOF where {expected} was expected")
    if kind in SECTION_NAMES:
        raise MainStreamError(f"{section_name(kind)} where {expected} was expected")
    raise MainStreamError(f"unknown section type {kind:#04x} where {expected} was expected")


def _section_head(
    ctx: ParseContext, kinds: Container[int], expected: str
) -> tuple[int, int] | None:
    """The section type (one of ``kinds``) and section id at ``ctx.pos``; None until buffered."""
    buf, pos = ctx.buf, ctx.pos
    if len(buf) - pos < 1:
        return None
    kind = buf[pos]
    if kind not in kinds:
        unexpected_section(kind, expected)
    if len(buf) - pos < 5:
        return None
    (section_id,) = BE32.unpack_from(buf, pos + 1)
    return kind, section_id


def setup_section(ctx: ParseContext) -> Step:
    """QEMU_VM_SECTION_START: section id, idstr "ram", instance id and version."""
    expected = "the RAM START section"
    head = _section_head(ctx, _START, expected)
    buf, pos = ctx.buf, ctx.pos
    if head is not None and head[0] == QEMU_VM_COMMAND:
        return command(ctx, expected, COMMANDS_BEFORE_RAM)
    if head is None or len(buf) - pos < 6:
        return NEED_DATA
    nlen = buf[pos + 5]
    if len(buf) - pos < 6 + nlen + 8:
        return NEED_DATA
    section_id = head[1]
    idstr = bytes(buf[pos + 6 : pos + 6 + nlen])
    if idstr != _RAM_IDSTR:
        raise MainStreamError(
            f"section {idstr!r} (id {section_id}) started before the RAM section; "
            "only 'ram' is supported there"
        )
    instance, version = INSTANCE_VERSION.unpack_from(buf, pos + 6 + nlen)
    if instance != RAM_INSTANCE_ID:
        raise MainStreamError(f"RAM section instance {instance}, expected {RAM_INSTANCE_ID}")
    if version != RAM_VERSION_ID:
        raise BadVersion(f"RAM section version {version}, expected {RAM_VERSION_ID}")
    ctx.pos = pos + 6 + nlen + 8
    ctx.section_id = section_id
    ctx.kind = QEMU_VM_SECTION_START
    return ctx.goto(State.MEM_SIZE)


def footer(ctx: ParseContext) -> Step:
    """The section footer after an EOS: QEMU_VM_SECTION_FOOTER and the RAM section's id."""
    buf, pos = ctx.buf, ctx.pos
    if len(buf) - pos < 5:
        return NEED_DATA
    marker, section_id = SECTION.unpack_from(buf, pos)
    if marker != QEMU_VM_SECTION_FOOTER:
        raise MainStreamError(
            f"missing section footer after the RAM EOS: byte {marker:#04x}, expected "
            f"{QEMU_VM_SECTION_FOOTER:#04x}"
        )
    if section_id != ctx.section_id:
        raise MainStreamError(
            f"section footer id {section_id} does not match the RAM section id {ctx.section_id}"
        )
    ctx.pos = pos + 5
    if ctx.kind == QEMU_VM_SECTION_END:
        return ctx.goto(State.AFTER_RAM, RamEnd())
    return ctx.goto(State.NEXT_SECTION)


def command(ctx: ParseContext, expected: str, allowed: Mapping[int, int]) -> Step:
    """A QEMU_VM_COMMAND at ``ctx.pos`` where ``expected`` may come instead: one of
    ``allowed`` (command: length of its data), else refused naming it. As QEMU's loader: a
    second OPEN_RETURN_PATH, or a PING with no return path open, is refused."""
    buf, pos = ctx.buf, ctx.pos
    if len(buf) - pos < COMMAND.size:
        return NEED_DATA
    _, cmd, length = COMMAND.unpack_from(buf, pos)
    name = MIG_CMD_NAMES.get(cmd, f"command {cmd}")
    if allowed.get(cmd) != length:
        raise MainStreamError(
            f"QEMU_VM_COMMAND {name} (length {length}) where {expected} was expected: unsupported"
        )
    if len(buf) - pos < COMMAND.size + length:
        return NEED_DATA
    if cmd == MIG_CMD_OPEN_RETURN_PATH:
        if ctx.return_path:
            raise MainStreamError(f"{name} twice")
        ctx.return_path = True
    elif cmd == MIG_CMD_PING and not ctx.return_path:
        raise MainStreamError(f"{name} with no return path open")
    ctx.pos = pos + COMMAND.size + length
    ctx.commands.append(cmd)
    return Command(cmd, bytes(buf[pos + COMMAND.size : ctx.pos]))


def next_section(ctx: ParseContext) -> Step:
    """A RAM PART or END section's header: its type and the RAM section's id."""
    expected = "a RAM PART or END section"
    head = _section_head(ctx, _NEXT, expected)
    if head is None:
        return NEED_DATA
    kind, section_id = head
    if kind == QEMU_VM_COMMAND:
        return command(ctx, expected, COMMANDS_BETWEEN_SECTIONS)
    if section_id != ctx.section_id:
        raise MainStreamError(
            f"{section_name(kind)} for section id {section_id} before the RAM section "
            f"(id {ctx.section_id}) ended"
        )
    ctx.pos += 5
    ctx.kind = kind
    return ctx.goto(State.RECORDS)
