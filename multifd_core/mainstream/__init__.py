"""Sans-I/O writer and incremental parser for the RAM part of QEMU's migration stream (7.2, and
the parser also 8.x-10.x: docs/qemu-versions.md).

The main channel carries QEMU's savevm stream (../shared/WIRE.md, "Main channel, the RAM part"):
the file header, the configuration record, then the "ram" section — a START section with the
block list, PART sections, an END section, each closed by an EOS record and a section footer.
With multifd its only page records are zero pages. What follows the RAM END section (QEMU's
device sections, EOF, the JSON description) is passed through unparsed.

No I/O, no trio: :class:`MainStreamWriter` appends to a buffer you :meth:`~MainStreamWriter.take`;
:class:`MainStreamParser` is fed bytes and hands out events one at a time, like h11.

Facts taken from QEMU's migration/ram.c and savevm.c:

- The source's ``last_sent_block`` (which decides RAM_SAVE_FLAG_CONTINUE) is reset only by
  ``ram_state_reset`` (at setup, and when the RAM block list changes), by the postcopy discard and
  on a postcopy channel switch — not at section boundaries. The destination's
  ``last_recv_block`` is never reset. So a CONTINUE record may refer to the previous section's
  last block; the writer does so and the parser accepts it.
- A record's be64 holds the page offset in the bits above TARGET_PAGE_BITS and the flags below.
- ``ram_load`` accepts only section version 4; the loader checks every section footer's id.
- QEMU 8.1+ with machine types 8.1+ syncs the channels at RAM_SAVE_FLAG_MULTIFD_FLUSH records
  instead of at every EOS (``records``); QEMU 10.0 with machine types 10.0+ writes a
  QEMU_VM_COMMAND MIG_CMD_SWITCHOVER_START before the RAM END section (``sections``).

The modules:

- ``constants``: QEMU's values (QEMU_VM_*, RAM_SAVE_FLAG_*), our limits, the byte layouts.
- ``events``: the parser's events and NEED_DATA.
- ``writer``: :class:`MainStreamWriter`.
- ``states``: the parser's states and allowed transitions (tables), and its context.
- ``parser``: :class:`MainStreamParser` and the table of state handlers, which live in
  ``setup`` (header, configuration, START section and block list), ``configuration`` (the
  configuration record and its subsections, a table), ``records`` (page records, a table by
  flags; EOS, footers, PART/END headers) and ``tail`` (after the RAM END section).

A new QEMU dialect is a row and a handler: a record kind in ``records.RECORD_READERS``, a
configuration subsection in ``configuration.SUBSECTIONS``, a part of the stream in
``states.State`` / ``states.TRANSITIONS`` and ``parser.HANDLERS``.
"""

from __future__ import annotations

from . import constants, events
from .constants import *  # noqa: F403  (QEMU's values and our limits)
from .events import *  # noqa: F403  (the parser's events and NEED_DATA)
from .parser import MainStreamParser
from .writer import MainStreamWriter

__all__ = [*constants.__all__, *events.__all__, "MainStreamParser", "MainStreamWriter"]
