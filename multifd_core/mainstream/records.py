"""The state handler for the RAM sections' bodies: page records up to the EOS record.

A record is a be64 holding the page offset above the page bits and the flags below, then what
its flags say. :data:`RECORD_READERS` is the table of the record kinds read here, by their
flags without CONTINUE: a new kind (a QEMU dialect) is a row and a reader. The one hot record,
a CONTINUE zero page, is read before the table is consulted.

Sync barriers (:class:`RoundEnd`): a QEMU source syncs its channels either at every EOS record
("per-section": QEMU 7.2, and machine types up to 8.0) or at every MULTIFD_FLUSH record
("per-round": machine types 8.1+), never both. The RAM START section tells which: a FLUSH
before its EOS makes the stream per-round (its EOS records are then no barrier), an EOS with
none before it per-section (a FLUSH after that is refused: QEMU's own loader would wait for a
second sync the source never sends).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, NoReturn, TypeAlias

import numpy as np

from ..errors import BadOffset, MainStreamError, UnknownBlock
from .constants import (
    BE64,
    QEMU_FLUSH_PER_ROUND,
    QEMU_FLUSH_PER_SECTION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_FULL,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RECORD_DTYPE,
    ZERO_CONT,
    ZERO_RUN_MAX,
    flag_names,
)
from .events import NEED_DATA, Page, RoundEnd, ZeroPage, ZeroPages
from .states import KnownBlock, ParseContext, State, Step

#: Reads the record at ``ctx.pos`` given its flags and offset (from its be64).
RecordReader: TypeAlias = Callable[[ParseContext, int, int], Step]

#: Flags of records QEMU may send that this side does not read (named in the refusal).
_UNSUPPORTED: Final = (
    RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_FULL
)


def records(ctx: ParseContext) -> Step:
    """One record of a RAM section (or a run of CONTINUE zero records, batched)."""
    buf, pos = ctx.buf, ctx.pos
    avail = len(buf) - pos
    if avail < 8:
        return NEED_DATA
    (value,) = BE64.unpack_from(buf, pos)
    flags = value & ctx.mask
    offset = value - flags
    if flags == ZERO_CONT:  # the common case: a zero page of the previous record's block
        if avail < 9:
            return NEED_DATA
        block = ctx.last
        if block is None:
            raise MainStreamError("CONTINUE record with no previous block")
        if offset > block.last:
            raise BadOffset(f"offset {offset:#x} is outside block {block.name!r}")
        if ctx.batch_zero_pages and avail >= 18:
            return zero_run(ctx, block)
        ctx.pos = pos + 9
        return ZeroPage(block.name, offset, buf[pos + 8])
    reader = RECORD_READERS.get(flags & ~RAM_SAVE_FLAG_CONTINUE)
    if reader is None:
        bad_flags(flags)
    return reader(ctx, flags, offset)


def zero_run(ctx: ParseContext, block: KnownBlock) -> ZeroPages:
    """The buffered run of CONTINUE zero records at ``ctx.pos`` (at least one), as one event."""
    pos = ctx.pos
    n = min((len(ctx.buf) - pos) // 9, ZERO_RUN_MAX)
    raw = np.frombuffer(ctx.buf, dtype=RECORD_DTYPE, count=n, offset=pos)
    values = raw["value"].astype(np.uint64)
    fills = raw["fill"].copy()
    del raw  # no view of the buffer may outlive this call: feed() resizes it
    mask = np.uint64(ctx.mask)
    same = (values & mask) == np.uint64(ZERO_CONT)
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
    ctx.pos = pos + 9 * n
    return ZeroPages(block.name, offsets, fills)


def _record_block(ctx: ParseContext, flags: int, offset: int) -> tuple[KnownBlock, int] | None:
    """The block a ZERO or PAGE record refers to, checked with its offset, and where the
    record's body starts; None until the block's name is buffered."""
    buf, p = ctx.buf, ctx.pos + 8
    if flags & RAM_SAVE_FLAG_CONTINUE:
        block = ctx.last
        if block is None:
            raise MainStreamError(f"CONTINUE record ({flag_names(flags)}) with no previous block")
    else:
        if len(buf) - p < 1:
            return None
        nlen = buf[p]
        if len(buf) - p < 1 + nlen:
            return None
        raw = bytes(buf[p + 1 : p + 1 + nlen])
        found = ctx.by_raw.get(raw)
        if found is None:
            shown = raw.decode("utf-8", "replace")
            raise UnknownBlock(f"{flag_names(flags)} record for unknown RAM block {shown!r}")
        block = found
        p += 1 + nlen
    if offset > block.last:
        raise BadOffset(f"offset {offset:#x} is outside block {block.name!r} ({block.size} bytes)")
    return block, p


def zero_record(ctx: ParseContext, flags: int, offset: int) -> Step:
    """RAM_SAVE_FLAG_ZERO: the page is its one fill byte repeated."""
    found = _record_block(ctx, flags, offset)
    if found is None or len(ctx.buf) - found[1] < 1:
        return NEED_DATA
    block, p = found
    ctx.pos = p + 1
    ctx.last = block
    return ZeroPage(block.name, offset, ctx.buf[p])


def page_record(ctx: ParseContext, flags: int, offset: int) -> Step:
    """RAM_SAVE_FLAG_PAGE: the whole page follows."""
    found = _record_block(ctx, flags, offset)
    if found is None or len(ctx.buf) - found[1] < ctx.page_size:
        return NEED_DATA
    block, p = found
    (data,) = ctx.page.unpack_from(ctx.buf, p)
    ctx.pos = p + ctx.page_size
    ctx.last = block
    return Page(block.name, offset, data)


def _barrier(ctx: ParseContext) -> RoundEnd:
    """A sync barrier of the RAM section: the event, counted."""
    event = RoundEnd(ctx.kind, ctx.round)
    ctx.round += 1
    return event


def flush_record(ctx: ParseContext, flags: int, offset: int) -> Step:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH (QEMU 8.1+): a sync barrier amid the records (ram_load's
    multifd_recv_sync_main), in a per-round stream only."""
    if flags != RAM_SAVE_FLAG_MULTIFD_FLUSH or offset:
        raise MainStreamError(f"bad MULTIFD_FLUSH record: offset {offset:#x}, {flag_names(flags)}")
    if ctx.flush == QEMU_FLUSH_PER_SECTION:
        raise MainStreamError(
            "MULTIFD_FLUSH record in a stream that syncs at each EOS (its setup had none)"
        )
    ctx.flush = QEMU_FLUSH_PER_ROUND
    ctx.pos += 8
    return _barrier(ctx)


def eos_record(ctx: ParseContext, flags: int, offset: int) -> Step:
    """RAM_SAVE_FLAG_EOS: the end of the section's records, and (per-section) of a sync round."""
    if flags != RAM_SAVE_FLAG_EOS or offset:
        raise MainStreamError(f"bad EOS record: offset {offset:#x}, {flag_names(flags)}")
    ctx.pos += 8
    if ctx.flush is None:  # the setup's EOS, no FLUSH before it
        ctx.flush = QEMU_FLUSH_PER_SECTION
    if ctx.flush == QEMU_FLUSH_PER_ROUND:
        return ctx.goto(State.FOOTER)
    # The round ends at the EOS record itself, not at the section footer after it: QEMU 7.2
    # flushes its stream right after the EOS but writes the footer into its buffer, where it
    # can stay while the source blocks on full multifd channels (their SYNC is in, so they
    # wait for this round end). QEMU's own loader syncs on reading the EOS.
    return ctx.goto(State.FOOTER, _barrier(ctx))


#: The record kinds read in a RAM section, by their flags without RAM_SAVE_FLAG_CONTINUE.
RECORD_READERS: Final[Mapping[int, RecordReader]] = {
    RAM_SAVE_FLAG_ZERO: zero_record,
    RAM_SAVE_FLAG_PAGE: page_record,
    RAM_SAVE_FLAG_EOS: eos_record,
    RAM_SAVE_FLAG_MULTIFD_FLUSH: flush_record,
}


def bad_flags(flags: int) -> NoReturn:
    """Refuse a record whose flags :data:`RECORD_READERS` does not know."""
    if flags & RAM_SAVE_FLAG_MEM_SIZE:
        raise MainStreamError(
            f"MEM_SIZE record ({flag_names(flags)}) outside the RAM START section's head"
        )
    unsupported = flags & _UNSUPPORTED
    if unsupported:
        raise MainStreamError(
            f"unsupported RAM record flag {flag_names(unsupported)} "
            f"(record flags {flag_names(flags)})"
        )
    raise MainStreamError(f"bad RAM record flags {flags:#x} ({flag_names(flags)})")
