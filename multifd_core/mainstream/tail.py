"""State handlers for what follows the RAM END section: our own sources' EOF and VM description,
or QEMU's device sections, passed through unparsed."""

from __future__ import annotations

from ..errors import MainStreamError
from .constants import BE32, MAX_VMDESC, QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, section_name
from .events import NEED_DATA, ConnectionEnd, DeviceState, Eof, VmDescription
from .states import ParseContext, State, Step


def _end(ctx: ParseContext) -> Step:
    """Where the stream may end: ConnectionEnd once the input has."""
    return ConnectionEnd() if ctx.eof else NEED_DATA


def after_ram(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    if len(buf) - pos < 1:
        return NEED_DATA
    if buf[pos] == QEMU_VM_EOF:
        ctx.pos = pos + 1
        return ctx.goto(State.AFTER_EOF, Eof())
    return ctx.goto(State.DEVICE_STATE)


def after_eof(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    avail = len(buf) - pos
    if avail < 1:
        return _end(ctx)
    if buf[pos] != QEMU_VM_VMDESCRIPTION:
        raise MainStreamError(
            f"{section_name(buf[pos])} after QEMU_VM_EOF; only a VMDESCRIPTION may follow"
        )
    if avail < 5:
        return NEED_DATA
    (length,) = BE32.unpack_from(buf, pos + 1)
    limit = MAX_VMDESC
    if ctx.max_device_state is not None:
        limit = min(limit, ctx.max_device_state)
    if length > limit:
        raise MainStreamError(f"VM description of {length} bytes exceeds the {limit} allowed")
    if avail < 5 + length:
        return NEED_DATA
    ctx.pos = pos + 5 + length
    return ctx.goto(State.DONE, VmDescription(bytes(buf[pos + 5 : pos + 5 + length])))


def done(ctx: ParseContext) -> Step:
    if len(ctx.buf) - ctx.pos:
        raise MainStreamError("bytes after the VM description")
    return _end(ctx)


def device_state(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    avail = len(buf) - pos
    if avail == 0:
        return _end(ctx)
    total = ctx.device_bytes + avail
    if ctx.max_device_state is not None and total > ctx.max_device_state:
        raise MainStreamError(
            f"device state after the RAM section exceeds {ctx.max_device_state} bytes"
        )
    ctx.device_bytes = total
    data = bytes(buf[pos:])
    ctx.pos = len(buf)
    return DeviceState(data)
