"""State handlers for what follows the RAM END section: our own sources' EOF and VM description,
or QEMU's device sections, passed through unparsed.

A QEMU source with a return path keeps the connection open after its last byte, until the
destination's SHUT: then the device state's end is found by its last record, the QEMU_VM_EOF
and QEMU_VM_VMDESCRIPTION (be32 length, JSON) that every QEMU precopy stream ends with (unless
the machine suppresses the description: s390x, some ppc), as :class:`StreamComplete`.
"""

from __future__ import annotations

import json
from typing import Final

from ..errors import MainStreamError
from .constants import BE32, MAX_VMDESC, QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, section_name
from .events import NEED_DATA, ConnectionEnd, DeviceState, Eof, StreamComplete, VmDescription
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
    if ctx.return_path and not ctx.complete:  # our own source's stream: EOF, the description
        ctx.complete = True
        return StreamComplete()
    return _end(ctx)


#: The last bytes of the device state kept to find its end (a VM description up to this long).
TAIL_MAX: Final = 4 << 20
_EOF_VMDESC: Final = bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION])


def ends_with_vmdesc(data: bytes | bytearray) -> bool:
    """Whether ``data`` ends with QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, be32 n, n bytes of JSON.

    The JSON holds no NUL byte, so the marker is one of the last few EOF-VMDESCRIPTION pairs
    (the length's own bytes may hold one or two)."""
    if not data.endswith(b"}"):
        return False
    end = len(data)
    for _ in range(3):
        p = data.rfind(_EOF_VMDESC, 0, end)
        if p < 0 or p + 6 > len(data):
            return False
        (length,) = BE32.unpack_from(data, p + 2)
        if p + 6 + length == len(data) and data[p + 6 : p + 7] == b"{":
            try:
                json.loads(bytes(data[p + 6 :]))
            except ValueError:
                return False
            return True
        end = p + 1
    return False


def device_state(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    avail = len(buf) - pos
    if avail == 0:
        if ctx.return_path and ends_with_vmdesc(ctx.device_tail):
            ctx.device_tail = bytearray()
            ctx.complete = True
            return ctx.goto(State.DONE, StreamComplete())
        return _end(ctx)
    total = ctx.device_bytes + avail
    if ctx.max_device_state is not None and total > ctx.max_device_state:
        raise MainStreamError(
            f"device state after the RAM section exceeds {ctx.max_device_state} bytes"
        )
    ctx.device_bytes = total
    data = bytes(buf[pos:])
    ctx.pos = len(buf)
    if ctx.return_path:
        tail = ctx.device_tail
        tail += data
        if len(tail) > TAIL_MAX:
            del tail[: len(tail) - TAIL_MAX]
    return DeviceState(data)
