"""The options of each end of a migration: the one home of every default and its validation.

``open_source``, ``open_destination``, ``migrate``, ``receive``, ``qemu_save``, ``qemu_restore`` and
the ``multifd`` command all build one of these frozen objects and read their defaults from it;
nothing else repeats a default. A bad value raises :class:`ConfigError` naming it when the
object is made.

Their keyword arguments (``open_source(..., channels=4)``) are typed by the ``*Changes``
TypedDicts below, which mirror the dataclasses' fields (names and types, no defaults: a test
keeps them equal): ``mypy --strict`` refuses a misspelt option or a wrong type where it is
passed, and ``build`` refuses a misspelt one at run time with a ConfigError naming it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, fields, replace
from typing import Any, Self, TypedDict

from .errors import ConfigError
from .methods import MultiFDMethod
from .registry import MethodRegistry, load_methods
from .wire import MAX_CHANNELS, MULTIFD_PACKET_SIZE, check_page_size, uuid_bytes

#: Where a source puts zero pages (QEMU's zero-page-detection): main-stream zero records
#: ("legacy"), the packets' zero-page list ("multifd", QEMU 9.0+), or nowhere ("none": sent as
#: normal pages).
ZERO_PAGE_DETECTION = ("multifd", "legacy", "none")

#: Bytes of pages per packet a source sends to a destination of ours (``packet_size``): four
#: times QEMU's MULTIFD_PACKET_SIZE, a quarter of the per-packet work (bench/README.md).
DEFAULT_PACKET_SIZE = 4 * MULTIFD_PACKET_SIZE
#: The largest packet a destination accepts by default (``max_packet_size``).
DEFAULT_MAX_PACKET_SIZE = 16 * MULTIFD_PACKET_SIZE
#: The largest ``packet_size`` / ``max_packet_size`` there is (a packet's buffers are made
#: per channel, on both ends).
PACKET_SIZE_LIMIT = 64 << 20

#: The RAM a destination accepts by default (``max_total_bytes``, ``multifd recv --max-size``).
DEFAULT_MAX_TOTAL_BYTES = 1 << 40


def default_thread_limit() -> int:
    """Worker threads for codec work: one per core."""
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EndOptions:
    """What both ends have: channels, the method, the uuid, worker threads and timeouts."""

    _: KW_ONLY
    #: multifd channels (QEMU: multifd-channels), 1..MAX_CHANNELS.
    channels: int = 2
    #: compression: a method name, alias, value, or a method object (QEMU: multifd-compression).
    method: str | int | MultiFDMethod = "none"
    #: options for the method (``{"level": "3"}``); not with a method object.
    method_options: Mapping[str, Any] | None = None
    #: where methods are found by name (default: ``load_methods()``).
    registry: MethodRegistry | None = None
    #: the migration's uuid: the source sends it, a destination given one requires it.
    uuid: str | bytes | None = None
    #: worker threads for codec work (default: one per core).
    thread_limit: int | None = None
    #: seconds for the connections to be made (source: each; destination: all of them).
    connect_timeout: float = 30.0
    #: seconds a channel may move no byte while the peer owes some (None: wait forever).
    idle_timeout: float | None = 60.0
    #: the return path's SHUT (QEMU's ``return-path`` capability): seconds a source waits for
    #: it after its last byte; a destination that failed writes it within this bound.
    return_path_timeout: float = 30.0
    #: seconds the whole migration may take, from opening the end to its completion (None: no
    #: bound); past it the migration fails with MigrationTimeout, whatever the peer still does
    #: (a source dripping a byte a second keeps every idle timeout quiet, not this one).
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(f"channel count {self.channels} outside 1..{MAX_CHANNELS}")
        if self.thread_limit is not None and self.thread_limit < 1:
            raise ConfigError(f"thread_limit must be >= 1, not {self.thread_limit}")
        if isinstance(self.method, MultiFDMethod) and self.method_options:
            raise ConfigError("options go to the method object itself")
        for f in fields(self):
            if f.name.endswith("_timeout") or f.name == "deadline":
                value = getattr(self, f.name)
                if value is not None and not value > 0:
                    raise ConfigError(f"{f.name} must be > 0 (or None), not {value}")

    @classmethod
    def build(cls, options: Self | None = None, /, **changes: Any) -> Self:
        """``options`` (default: the defaults) with ``changes``; an unknown name is refused."""
        check_known(changes, {f.name for f in fields(cls)} - {"_"}, cls.__name__)
        if options is None:
            return cls(**changes)
        return replace(options, **changes) if changes else options

    def resolve_method(self) -> MultiFDMethod:
        """The method object: ``method`` itself, or made from the registry by name/value."""
        if isinstance(self.method, MultiFDMethod):
            return self.method
        reg = self.registry if self.registry is not None else load_methods()
        return reg.create(self.method, **dict(self.method_options or {}))

    @property
    def uuid_bytes(self) -> bytes | None:
        return None if self.uuid is None else uuid_bytes(self.uuid)

    @property
    def threads(self) -> int:
        return self.thread_limit or default_thread_limit()


@dataclass(frozen=True)
class SourceOptions(EndOptions):
    """The sending end (``open_source``, ``migrate``, ``qemu_restore``)."""

    _: KW_ONLY
    #: the machine type announced in the configuration section (QEMU checks it).
    machine_type: str = "pc-q35-7.2"
    #: JSON bytes sent after EOF, where QEMU puts its vmdesc.
    description: bytes | None = None
    #: the RAM section's id in the main stream.
    section_id: int = 2
    #: when given, replaces EOF: the bytes QEMU sends after its RAM section (device state).
    device_state: bytes | None = None
    #: one of ZERO_PAGE_DETECTION; None: QEMU's default for ``machine_type`` (legacy up to
    #: 8.2 machine types, multifd after).
    zero_page_detection: str | None = None
    #: QEMU's multifd-flush-after-each-section: True, the destination syncs at each section's
    #: EOS (machine types up to 8.0); False, at a RAM_SAVE_FLAG_MULTIFD_FLUSH record once per
    #: round; None: as ``machine_type`` says.
    multifd_flush_after_each_section: bool | None = None
    #: open a return path (QEMU's ``return-path`` capability): MIG_CMD_OPEN_RETURN_PATH after
    #: the header; ``complete()`` returns only once the destination's SHUT said all landed.
    return_path: bool = False
    #: a checksum in every packet, announced in each init packet (the multifd-py extension:
    #: docs/wire-extensions.md); a destination of ours checks it after the pages landed, a QEMU
    #: one ignores it. ``qemu_restore`` turns it off (QEMU cannot check it).
    integrity: bool = True
    #: after the last round, send a digest of each block's final content in the description
    #: after EOF; a destination of ours checks them before the migration counts as completed.
    #: Needs the description slot: not with ``device_state``; a ``description`` must then be a
    #: JSON object.
    verify: bool = False
    #: bytes of pages per packet (rounded down to whole pages, at least one). QEMU's
    #: MULTIFD_PACKET_SIZE (512 KiB) is what QEMU sends and takes; another size is announced in
    #: each init packet (the multifd-py extension, docs/wire-extensions.md) and needs a
    #: destination of ours (``max_packet_size``). ``qemu_restore`` sends QEMU's.
    packet_size: int = DEFAULT_PACKET_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_packet_size("packet_size", self.packet_size)
        zpd = self.zero_page_detection
        if zpd is not None and zpd not in ZERO_PAGE_DETECTION:
            raise ConfigError(
                f"zero_page_detection {zpd!r} is not one of {', '.join(ZERO_PAGE_DETECTION)}"
            )
        if self.verify:
            if self.device_state is not None:
                raise ConfigError("verify needs the description after EOF: not with device_state")
            from .integrity import description_object  # trio, xxhash: not for --help

            description_object(self.description)  # ConfigError unless a JSON object


@dataclass(frozen=True)
class DestinationOptions(EndOptions):
    """The receiving end (``open_destination``, ``receive``, ``qemu_save``)."""

    _: KW_ONLY
    #: the page size of the blocks (the source's must match).
    page_size: int = 4096
    #: seconds for each connection's first bytes (and its TLS handshake).
    handshake_timeout: float = 10.0
    #: handshakes that may run at once (never fewer than main + channels); a connection
    #: beyond them drops the oldest pending one (``accept.py``).
    max_pending_handshakes: int = 32
    #: seconds for the channels to close after the end of the migration.
    drain_timeout: float = 30.0
    #: bytes of device state (after the RAM section) kept at most (None: no limit).
    max_device_state: int | None = 64 * 1024 * 1024
    #: RAM blocks the source may announce.
    max_blocks: int = 4096
    #: bytes of RAM the source may announce (None: no limit).
    max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES
    #: read the ``zero_pages`` field (bytes 32..35 of a packet: QEMU 9.0+ and our own source
    #: with ``zero_page_detection="multifd"``) and zero those pages. QEMU 7.2 sends zeros there
    #: (its unused[]), so reading it is safe with every source; False: the bytes are not read.
    zero_page_packets: bool = True
    #: require the source's content digests (its ``verify``) and check them; without it they
    #: are checked when the source sends them. Packet checksums are checked whenever a channel
    #: announced them.
    verify: bool = False
    #: the largest packet (bytes of pages) a source of ours may announce; QEMU's own size is
    #: always taken.
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_page_size(self.page_size)
        check_packet_size("max_packet_size", self.max_packet_size)
        for name in ("max_blocks", "max_total_bytes", "max_device_state"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, not {value}")
        if self.max_pending_handshakes < 1:
            raise ConfigError(
                f"max_pending_handshakes must be >= 1, not {self.max_pending_handshakes}"
            )


def check_packet_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer number of bytes, not {value!r}")
    if not 0 < value <= PACKET_SIZE_LIMIT:
        raise ConfigError(f"{name} {value} outside 1..{PACKET_SIZE_LIMIT}")


def check_known(changes: Mapping[str, object], known: set[str], what: str) -> None:
    """ConfigError naming the names of ``changes`` that are not ``known`` (and the nearest)."""
    unknown = sorted(set(changes) - known)
    if unknown:
        near = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1)]
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {what} "
            f"({hint}known: {', '.join(sorted(known))})"
        )


# --- the keyword arguments: the fields above, typed for mypy (tests/test_public_api.py) -------


class EndChanges(TypedDict, total=False):
    """The keywords of both ends: the fields of :class:`EndOptions`."""

    channels: int
    method: str | int | MultiFDMethod
    method_options: Mapping[str, Any] | None
    registry: MethodRegistry | None
    uuid: str | bytes | None
    thread_limit: int | None
    connect_timeout: float
    idle_timeout: float | None
    return_path_timeout: float
    deadline: float | None


class SourceChanges(EndChanges, total=False):
    """The keywords of ``open_source`` and ``migrate``: the fields of :class:`SourceOptions`."""

    machine_type: str
    description: bytes | None
    section_id: int
    device_state: bytes | None
    zero_page_detection: str | None
    multifd_flush_after_each_section: bool | None
    return_path: bool
    integrity: bool
    verify: bool
    packet_size: int


class DestinationChanges(EndChanges, total=False):
    """The keywords of ``open_destination``, ``receive`` and ``qemu_save``: the fields of
    :class:`DestinationOptions`."""

    page_size: int
    handshake_timeout: float
    max_pending_handshakes: int
    drain_timeout: float
    max_device_state: int | None
    max_blocks: int
    max_total_bytes: int | None
    zero_page_packets: bool
    verify: bool
    max_packet_size: int


class RestoreChanges(TypedDict, total=False):
    """The keywords of ``qemu_restore``: the fields of :class:`SourceOptions` but those the
    snapshot gives (:data:`FROM_SNAPSHOT`)."""

    channels: int
    method: str | int | MultiFDMethod
    method_options: Mapping[str, Any] | None
    registry: MethodRegistry | None
    thread_limit: int | None
    connect_timeout: float
    idle_timeout: float | None
    return_path_timeout: float
    deadline: float | None
    zero_page_detection: str | None
    multifd_flush_after_each_section: bool | None
    return_path: bool
    integrity: bool


#: The fields of SourceOptions that ``qemu_restore`` takes from the snapshot (``verify``: its
#: digests need the description slot, which the device state takes; ``packet_size``: QEMU
#: takes its own only).
FROM_SNAPSHOT = frozenset(
    {"uuid", "machine_type", "section_id", "device_state", "description", "verify", "packet_size"}
)


#: ``qemu_save`` and ``multifd qemu-save``: a destination waiting for a person to start QEMU's
#: migration, so it waits longer for the connections.
QEMU_SAVE_DEFAULTS = DestinationOptions(connect_timeout=120.0)
#: ``multifd recv``: waits for its ``multifd send``, started by hand, longer than an embedder.
RECV_DEFAULTS = DestinationOptions(connect_timeout=60.0)


__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_MAX_TOTAL_BYTES",
    "DEFAULT_PACKET_SIZE",
    "PACKET_SIZE_LIMIT",
    "FROM_SNAPSHOT",
    "DestinationChanges",
    "EndChanges",
    "RestoreChanges",
    "SourceChanges",
    "check_known",
    "ZERO_PAGE_DETECTION",
    "QEMU_SAVE_DEFAULTS",
    "RECV_DEFAULTS",
    "DestinationOptions",
    "EndOptions",
    "SourceOptions",
    "default_thread_limit",
]
