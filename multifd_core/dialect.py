"""Which dialect of the multifd stream a source speaks, from its options and the machine type.

QEMU's wire changed after 7.2 in two ways a source must match to its destination:

- the sync: machine types up to 8.0 (``multifd-flush-after-each-section`` on) sync the channels at
  every RAM section's EOS; newer ones only at a ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` record, which a
  source writes once per round after the channels' SYNC packets (and after the setup's sync);
- zero pages: with ``zero-page-detection=multifd`` (the default of machine types newer than 8.2)
  they travel in the packets' zero-page list; with ``legacy`` as main-stream zero records.

A QEMU destination reads both kinds of zero page (from 9.0; 7.2 to 8.2 ignore the packets' list),
but it hangs on the wrong sync. :func:`resolve` decides, and refuses what it cannot serve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError
from .options import SourceOptions

#: The last machine-type version whose migration syncs after each section (hw_compat_8_0).
LAST_PER_SECTION = (8, 0)
#: The last machine-type version whose zero-page-detection defaults to legacy (hw_compat_8_2).
LAST_LEGACY_ZERO = (8, 2)

_VERSION = re.compile(r"-(\d+)\.(\d+)$")


def machine_version(machine_type: str) -> tuple[int, int] | None:
    """The QEMU version a versioned machine type names (``pc-q35-7.2``: (7, 2)); None when it has
    none (``microvm``, ``none``)."""
    m = _VERSION.search(machine_type)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, slots=True)
class Dialect:
    """What a source writes: where zero pages go and how the channels are synced."""

    #: one of ZERO_PAGE_DETECTION ("multifd", "legacy", "none").
    zero_pages: str
    #: True: sync at each section's EOS (QEMU 7.2); False: a MULTIFD_FLUSH record per round.
    flush_after_each_section: bool

    @property
    def zero_pages_in_packets(self) -> bool:
        return self.zero_pages == "multifd"

    @property
    def detect_zero(self) -> bool:
        """Whether the source tests pages for zero at all."""
        return self.zero_pages != "none"


def resolve(options: SourceOptions, *, qemu: bool = False) -> Dialect:
    """The dialect ``options`` ask for, each unset part from the machine type (a machine type
    without a version: QEMU 7.2's dialect, unless ``qemu``).

    ``qemu``: the destination is a real QEMU; raises ConfigError (one line, the reason) for a
    machine type that does not say what an unset part must be, or for zero pages in packets to
    a machine type that an older QEMU (before 9.0, which ignores the packets' zero-page list)
    may run."""
    machine = options.machine_type
    version = machine_version(machine)
    flush = options.multifd_flush_after_each_section
    zero = options.zero_page_detection
    if qemu and version is None and (flush is None or zero is None):
        unset = "multifd_flush_after_each_section" if flush is None else "zero_page_detection"
        raise ConfigError(
            f"machine type {machine!r} names no QEMU version: set {unset} for its destination"
        )
    old_zero = version is None or version <= LAST_LEGACY_ZERO
    if qemu and zero == "multifd" and version is not None and old_zero:
        raise ConfigError(
            f"zero pages in packets need QEMU 9.0+, and machine type {machine!r} may run on an "
            f"older QEMU that ignores them: use zero-page-detection legacy or none"
        )
    if flush is None:
        flush = version is None or version <= LAST_PER_SECTION
    if zero is None:
        zero = "legacy" if old_zero else "multifd"
    return Dialect(zero, flush)


__all__ = ["LAST_LEGACY_ZERO", "LAST_PER_SECTION", "Dialect", "machine_version", "resolve"]
