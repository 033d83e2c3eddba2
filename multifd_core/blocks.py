"""The blocks a source announces, at the destination: the limits on them, and where each comes
from (one the program gave, or one a factory makes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .errors import BlockMismatch, ConfigError, LimitExceeded
from .ram import RAMBlock

#: ``factory(name, size, page_size)`` makes a block the source announced.
BlockFactory = Callable[[str, int, int], RAMBlock]


def allocate_block(name: str, size: int, page_size: int) -> RAMBlock:
    """The default block factory: zero-filled anonymous memory."""
    return RAMBlock.allocate(name, size, page_size)


def check_total(announced: Sequence[tuple[str, int]], limit: int | None) -> int:
    """The bytes of RAM announced in all; LimitExceeded past ``limit`` (None: no limit)."""
    total = sum(size for _, size in announced)
    if limit is not None and total > limit:
        raise LimitExceeded(
            f"the source announces {total} bytes of RAM in {len(announced)} block(s), "
            f"more than the {limit} allowed here"
        )
    return total


def take_block(
    name: str,
    size: int,
    page_size: int,
    given: Mapping[str, RAMBlock] | None,
    factory: BlockFactory,
) -> RAMBlock:
    """The block the source announced as ``name`` of ``size`` bytes: the program's own from
    ``given`` (its name and size must match), else one ``factory`` makes; it must be writable
    and have ``page_size``."""
    if given is None:
        try:
            block = factory(name, size, page_size)
        except (OSError, MemoryError, OverflowError) as exc:
            raise LimitExceeded(f"cannot allocate block {name!r} of {size} bytes: {exc}") from exc
    else:
        found = given.get(name)
        if found is None:
            raise BlockMismatch(f"the source migrates block {name!r}, unknown here")
        if found.size != size:
            raise BlockMismatch(f"block {name!r} is {size} bytes at the source, {found.size} here")
        block = found
    if not block.writable:
        raise ConfigError(f"block {name!r} is read-only: cannot receive into it")
    if block.page_size != page_size:
        raise ConfigError(f"block {name!r} has page size {block.page_size}")
    return block


__all__ = ["BlockFactory", "allocate_block", "check_total", "take_block"]
