"""The incremental parser: bytes in, events out, one state handler at a time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ..errors import ConfigError, MultiFDError, TruncatedStream
from ..wire import check_page_size
from . import records, sections, setup, tail
from .events import NEED_DATA, MainEvent, NeedData
from .states import Handler, ParseContext, State

__all__ = ["HANDLERS", "MainStreamParser"]

#: Each state's handler (the transitions between them: :data:`.states.TRANSITIONS`).
HANDLERS: Final[Mapping[State, Handler]] = {
    State.HEADER: setup.header,
    State.AFTER_HEADER: setup.after_header,
    State.SETUP_SECTION: sections.setup_section,
    State.MEM_SIZE: setup.mem_size,
    State.BLOCK_ENTRY: setup.block_entry,
    State.RECORDS: records.records,
    State.FOOTER: sections.footer,
    State.NEXT_SECTION: sections.next_section,
    State.AFTER_RAM: tail.after_ram,
    State.AFTER_EOF: tail.after_eof,
    State.DONE: tail.done,
    State.DEVICE_STATE: tail.device_state,
}


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
        self._ctx = ParseContext(
            HANDLERS,
            page_size=page_size,
            max_blocks=max_blocks,
            max_device_state=max_device_state,
            batch_zero_pages=batch_zero_pages,
        )
        self._failed: MultiFDError | None = None

    @property
    def section_id(self) -> int | None:
        """The RAM section's id, once its START section was read."""
        return self._ctx.section_id

    @property
    def blocks(self) -> tuple[tuple[str, int], ...]:
        """The block list (name, size), once it was read."""
        return self._ctx.blocks

    @property
    def flush(self) -> str | None:
        """Where the source syncs its channels (QEMU_FLUSH_PER_SECTION or QEMU_FLUSH_PER_ROUND),
        once the RAM START section told."""
        return self._ctx.flush

    @property
    def commands(self) -> tuple[int, ...]:
        """The QEMU_VM_COMMAND numbers read so far, in order."""
        return tuple(self._ctx.commands)

    @property
    def state(self) -> State:
        """Where the parser is in the stream."""
        return self._ctx.state

    # -- input

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer."""
        if self._ctx.eof:
            raise ConfigError("feed after feed_eof")
        if data:
            self._ctx.feed(data)

    def feed_eof(self) -> None:
        """The peer closed the stream: no more bytes will come."""
        self._ctx.eof = True

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet parsed."""
        return len(self._ctx.buf) - self._ctx.pos

    # -- output

    def next_event(self) -> MainEvent | NeedData:
        """The next event, or NEED_DATA when more bytes are needed to produce one."""
        if self._failed is not None:
            raise self._failed
        ctx = self._ctx
        try:
            while True:
                ev = ctx.handler(ctx)
                if ev is not None:
                    break
            if ev is NEED_DATA and ctx.eof:
                raise TruncatedStream(
                    f"main stream truncated in {ctx.state.value} "
                    f"({len(ctx.buf) - ctx.pos} bytes left unparsed)"
                )
        except MultiFDError as exc:
            self._failed = exc
            raise
        return ev
