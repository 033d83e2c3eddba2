"""State handlers for the stream's beginning: the file header, the configuration, and the RAM
START section's block list (its header: :mod:`.sections`)."""

from __future__ import annotations

from ..errors import BadMagic, BadVersion, BlockMismatch, LimitExceeded, MainStreamError
from ..wire import RAMBLOCK_NAME_MAX
from .configuration import read_configuration
from .constants import (
    BE64,
    HEADER,
    MAGIC_BYTES,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SAVE_FLAG_MEM_SIZE,
    flag_names,
)
from .events import NEED_DATA, Header, RamBlocks
from .states import KnownBlock, ParseContext, State, Step


def header(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    avail = len(buf) - pos
    if avail < 8:
        have = bytes(buf[pos : pos + min(avail, 4)])
        if not MAGIC_BYTES.startswith(have):
            raise BadMagic(f"main stream starts with {have!r}, not QEMU_VM_FILE_MAGIC")
        return NEED_DATA
    magic, version = HEADER.unpack_from(buf, pos)
    if magic != QEMU_VM_FILE_MAGIC:
        raise BadMagic(f"main stream magic {magic:#010x}, expected {QEMU_VM_FILE_MAGIC:#010x}")
    if version != QEMU_VM_FILE_VERSION:
        raise BadVersion(f"main stream version {version}, expected {QEMU_VM_FILE_VERSION}")
    ctx.pos = pos + 8
    return ctx.goto(State.AFTER_HEADER, Header(version))


def after_header(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    if len(buf) - pos < 1:
        return NEED_DATA
    if buf[pos] != QEMU_VM_CONFIGURATION:
        return ctx.goto(State.SETUP_SECTION)  # the configuration is optional (old machines)
    parsed = read_configuration(buf, pos + 1, ctx.page_size)
    if parsed is None:
        return NEED_DATA
    event, ctx.pos = parsed
    return ctx.goto(State.SETUP_SECTION, event)


def mem_size(ctx: ParseContext) -> Step:
    buf, pos = ctx.buf, ctx.pos
    if len(buf) - pos < 8:
        return NEED_DATA
    (value,) = BE64.unpack_from(buf, pos)
    flags = value & ctx.mask
    if flags != RAM_SAVE_FLAG_MEM_SIZE:
        raise MainStreamError(
            f"RAM START section begins with a {flag_names(flags)} record, not MEM_SIZE"
        )
    ctx.pos = pos + 8
    ctx.setup_left = value - flags
    ctx.setup = []
    return ctx.goto(State.BLOCK_ENTRY)


def _check_block(ctx: ParseContext, raw: bytes, size: int) -> str:
    """The name of block list entry ``raw`` of ``size`` bytes, if the entry may be added."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BlockMismatch(f"RAM block name {raw!r} is not UTF-8") from None
    if b"\0" in raw or len(raw) > RAMBLOCK_NAME_MAX:
        raise BlockMismatch(f"RAM block name {raw!r} is not a valid name")
    if raw in ctx.by_raw:
        raise BlockMismatch(f"RAM block {name!r} listed twice")
    if size == 0 or size & ctx.mask:
        raise BlockMismatch(
            f"RAM block {name!r} size {size} is not a positive multiple of "
            f"the page size {ctx.page_size}"
        )
    if size > ctx.setup_left:
        raise BlockMismatch(
            f"RAM block {name!r} size {size} exceeds the {ctx.setup_left} bytes left "
            "of the announced total"
        )
    if len(ctx.setup) >= ctx.max_blocks:
        raise LimitExceeded(f"the source announces more than {ctx.max_blocks} RAM blocks")
    return name


def block_entry(ctx: ParseContext) -> Step:
    if ctx.setup_left == 0:
        ctx.blocks = tuple(ctx.setup)
        ctx.setup = []
        assert ctx.section_id is not None
        return ctx.goto(State.RECORDS, RamBlocks(ctx.blocks, ctx.section_id))
    buf, pos = ctx.buf, ctx.pos
    avail = len(buf) - pos
    if avail < 1:
        return NEED_DATA
    nlen = buf[pos]
    if nlen == 0:
        raise BlockMismatch("RAM block with an empty name in the block list")
    if avail < 1 + nlen + 8:
        return NEED_DATA
    raw = bytes(buf[pos + 1 : pos + 1 + nlen])
    (size,) = BE64.unpack_from(buf, pos + 1 + nlen)
    name = _check_block(ctx, raw, size)
    ctx.pos = pos + 1 + nlen + 8
    ctx.setup.append((name, size))
    ctx.by_raw[raw] = KnownBlock(name, size, ctx.page_size)
    ctx.setup_left -= size
    return None
