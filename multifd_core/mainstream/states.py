"""The parser's states and the transitions allowed between them, as tables (after h11's
``_state.py``), and the context the state handlers read and advance.

A state's handler (see :data:`~multifd_core.mainstream.parser.HANDLERS`) looks at the bytes at
``ctx.pos`` and returns an event, or :data:`NEED_DATA`; it moves to another state with
:meth:`ParseContext.goto`, which refuses a transition :data:`TRANSITIONS` does not list and
returns the event to hand out on the way (None: run the new state's handler at once). A new
part of the stream (a QEMU dialect) is a row here and a handler there.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from typing import Final, TypeAlias

from .constants import QEMU_VM_SECTION_START
from .events import MainEvent, NeedData


class State(enum.Enum):
    """Where the parser is in the stream; the value names it in messages."""

    HEADER = "header"  # file magic and version
    AFTER_HEADER = "after header"  # the optional configuration record
    SETUP_SECTION = "setup section"  # the RAM START section's header
    MEM_SIZE = "mem size"  # its MEM_SIZE record: the total of the block list
    BLOCK_ENTRY = "block entry"  # one entry of the block list, until the total is used up
    RECORDS = "records"  # page records of a RAM section, until its EOS
    FOOTER = "footer"  # the section footer after an EOS
    NEXT_SECTION = "next section"  # a RAM PART or END section's header
    AFTER_RAM = "after ram"  # after the RAM END section: our EOF or QEMU's device state
    AFTER_EOF = "after eof"  # after our EOF: the optional VM description
    DONE = "done"  # after the VM description: nothing more may come
    DEVICE_STATE = "device state"  # QEMU's device sections, passed through to the end (with a
    # return path: to the VM description that ends them, as the source waits for SHUT)


S = State
#: The states each state may move to.
TRANSITIONS: Final[Mapping[State, frozenset[State]]] = {
    S.HEADER: frozenset({S.AFTER_HEADER}),
    S.AFTER_HEADER: frozenset({S.SETUP_SECTION}),
    S.SETUP_SECTION: frozenset({S.MEM_SIZE}),
    S.MEM_SIZE: frozenset({S.BLOCK_ENTRY}),
    S.BLOCK_ENTRY: frozenset({S.RECORDS}),
    S.RECORDS: frozenset({S.FOOTER}),
    S.FOOTER: frozenset({S.NEXT_SECTION, S.AFTER_RAM}),
    S.NEXT_SECTION: frozenset({S.RECORDS}),
    S.AFTER_RAM: frozenset({S.AFTER_EOF, S.DEVICE_STATE}),
    S.AFTER_EOF: frozenset({S.DONE}),
    S.DONE: frozenset(),
    S.DEVICE_STATE: frozenset({S.DONE}),
}
del S

Step: TypeAlias = "MainEvent | NeedData | None"
Handler: TypeAlias = "Callable[[ParseContext], Step]"


class KnownBlock:
    """A RAM block of the block list, as records refer to it."""

    __slots__ = ("last", "name", "size")

    def __init__(self, name: str, size: int, page_size: int) -> None:
        self.name = name
        self.size = size
        self.last = size - page_size  # the highest valid page offset


class ParseContext:
    """The parser's buffer, its position, its state and what the RAM section told so far."""

    __slots__ = (
        "batch_zero_pages",
        "blocks",
        "buf",
        "by_raw",
        "commands",
        "complete",
        "device_bytes",
        "device_tail",
        "eof",
        "flush",
        "handler",
        "handlers",
        "kind",
        "last",
        "mask",
        "max_blocks",
        "max_device_state",
        "page",
        "page_size",
        "pos",
        "return_path",
        "round",
        "section_id",
        "setup",
        "setup_left",
        "state",
    )

    def __init__(
        self,
        handlers: Mapping[State, Handler],
        *,
        page_size: int,
        max_blocks: int,
        max_device_state: int | None,
        batch_zero_pages: bool,
    ) -> None:
        self.handlers = handlers
        self.state = State.HEADER
        self.handler: Handler = handlers[State.HEADER]
        self.page_size = page_size
        self.max_blocks = max_blocks
        self.max_device_state = max_device_state
        self.batch_zero_pages = batch_zero_pages
        self.mask = page_size - 1
        self.page = struct.Struct(f"{page_size}s")
        self.buf = bytearray()
        self.pos = 0
        self.eof = False
        # the RAM section
        self.section_id: int | None = None
        self.blocks: tuple[tuple[str, int], ...] = ()
        self.by_raw: dict[bytes, KnownBlock] = {}
        self.setup: list[tuple[str, int]] = []  # the block list while it is read
        self.setup_left = 0  # bytes of the announced total not yet listed
        self.kind = QEMU_VM_SECTION_START  # the open section's type
        self.round = 0  # sync barriers so far (EOS or MULTIFD_FLUSH records)
        self.flush: str | None = None  # where the source syncs, once the setup told
        self.commands: list[int] = []  # the QEMU_VM_COMMANDs read, in order
        self.last: KnownBlock | None = None  # QEMU's last_recv_block
        self.device_bytes = 0
        self.return_path = False  # MIG_CMD_OPEN_RETURN_PATH was read
        self.complete = False  # StreamComplete was handed out
        self.device_tail = bytearray()  # the device state's last bytes, with a return path

    def goto(self, state: State, event: MainEvent | None = None) -> MainEvent | None:
        """Move to ``state`` and return ``event`` (what the handler hands out on the way).

        Only along :data:`TRANSITIONS`: anything else is a bug in a handler.
        """
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"main stream parser: no transition {self.state} -> {state}")
        self.state = state
        self.handler = self.handlers[state]
        return event

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``, first dropping what was parsed when that is cheap."""
        if self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos >= 1 << 16 and self.pos * 2 >= len(self.buf):
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data
