"""The main channel's RAM part: writer bytes, parser events and every validation rule."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd_core import mainstream as ms
from multifd_core.errors import (
    BadMagic,
    BadOffset,
    BadVersion,
    BlockMismatch,
    ConfigError,
    LimitExceeded,
    MainStreamError,
    MultiFDError,
    TruncatedStream,
    UnknownBlock,
)
from multifd_core.mainstream import (
    NEED_DATA,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    Command,
    Configuration,
    ConnectionEnd,
    DeviceState,
    Eof,
    Header,
    MainEvent,
    MainStreamParser,
    MainStreamWriter,
    Page,
    RamBlocks,
    RamEnd,
    RoundEnd,
    VmDescription,
    ZeroPage,
    ZeroPages,
)
from multifd_core.mainstream.constants import flag_names, section_name
from multifd_core.mainstream.parser import HANDLERS
from multifd_core.mainstream.records import RECORD_READERS
from multifd_core.mainstream.states import TRANSITIONS, ParseContext, State

PS = 4096


# --- hand-built bytes, straight from WIRE.md's layout ---------------------------------------


def be32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def be64(v: int) -> bytes:
    return v.to_bytes(8, "big")


def counted(name: bytes) -> bytes:
    return bytes([len(name)]) + name


HEAD = b"QEVM\x00\x00\x00\x03"
CONFIG = b"\x07\x00\x00\x00\x0apc-q35-7.2"


def config(name: bytes = b"pc-q35-7.2", subs: bytes = b"") -> bytes:
    return b"\x07" + be32(len(name)) + name + subs


def subsection(name: bytes, body: bytes, version: int = 1) -> bytes:
    return b"\x05" + counted(name) + be32(version) + body


def start(sid: int = 2, idstr: bytes = b"ram", instance: int = 0, version: int = 4) -> bytes:
    return b"\x01" + be32(sid) + counted(idstr) + be32(instance) + be32(version)


def block_list(blocks: Sequence[tuple[bytes, int]], total: int | None = None) -> bytes:
    if total is None:
        total = sum(size for _, size in blocks)
    return be64(total | 0x04) + b"".join(counted(name) + be64(size) for name, size in blocks)


def eos(sid: int = 2) -> bytes:
    return be64(0x10) + b"\x7e" + be32(sid)


def part(sid: int = 2) -> bytes:
    return b"\x02" + be32(sid)


def end(sid: int = 2) -> bytes:
    return b"\x03" + be32(sid)


def flush() -> bytes:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH (QEMU 8.1+, machine types 8.1+)."""
    return be64(0x200)


def command(cmd: int, data: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND: be16 command, be16 length, data."""
    return b"\x08" + cmd.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


SWITCHOVER_START = command(11)  # QEMU 10.0, machine types 10.0+, before the RAM END section


def zero(offset: int, name: bytes | None, fill: int = 0) -> bytes:
    if name is None:
        return be64(offset | 0x02 | 0x20) + bytes([fill])
    return be64(offset | 0x02) + counted(name) + bytes([fill])


def page(offset: int, name: bytes | None, data: bytes) -> bytes:
    if name is None:
        return be64(offset | 0x08 | 0x20) + data
    return be64(offset | 0x08) + counted(name) + data


BLOCKS = [(b"pc.ram", 16 * PS), (b"vga", 2 * PS)]
PRE = HEAD + CONFIG + start() + block_list(BLOCKS) + eos()
#: QEMU 10.0's beginning with a machine type 8.1+: a FLUSH before the setup's EOS.
PRE10 = HEAD + config(b"pc-q35-10.0") + start() + block_list(BLOCKS) + flush() + eos()
PRE_EVENTS: list[MainEvent] = [
    Header(3),
    Configuration("pc-q35-7.2", {}),
    RamBlocks((("pc.ram", 16 * PS), ("vga", 2 * PS)), 2),
    RoundEnd(QEMU_VM_SECTION_START, 0),
]


# --- helpers --------------------------------------------------------------------------------


def drain(parser: MainStreamParser, out: list[MainEvent]) -> bool:
    """Collect events until NEED_DATA (False) or ConnectionEnd (True)."""
    while True:
        ev = parser.next_event()
        if ev is NEED_DATA:
            return False
        assert not isinstance(ev, type(NEED_DATA))
        out.append(ev)
        if isinstance(ev, ConnectionEnd):
            return True


def parse(
    data: bytes, cuts: Sequence[int] = (), *, eof: bool = True, **kw: int | None
) -> list[MainEvent]:
    """Feed ``data`` split at ``cuts``, collecting events after every feed."""
    parser = MainStreamParser(**kw)  # type: ignore[arg-type]
    out: list[MainEvent] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        parser.feed(data[last:cut])
        last = cut
        drain(parser, out)
    if eof:
        parser.feed_eof()
        assert drain(parser, out)
    return out


def parse_error(data: bytes, **kw: int | None) -> MultiFDError:
    parser = MainStreamParser(**kw)  # type: ignore[arg-type]
    parser.feed(data)
    parser.feed_eof()
    with pytest.raises(MultiFDError) as info:
        drain(parser, [])
    return info.value


def merge_device_state(events: list[MainEvent]) -> list[MainEvent]:
    """Join consecutive DeviceState chunks (their split depends on how bytes arrived)."""
    out: list[MainEvent] = []
    for ev in events:
        if isinstance(ev, DeviceState) and out and isinstance(out[-1], DeviceState):
            out[-1] = DeviceState(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


# --- QEMU's values, as QEMU 7.2 defines them ------------------------------------------------

#: Copied from QEMU 7.2's migration/savevm.c, migration/ram.c and migration/qemu-file.h (the
#: one place the tests spell these values; RAM_SAVE_FLAG_MULTIFD_FLUSH is QEMU 8.1's ram.c).
QEMU_DEFINES = """
#define QEMU_VM_FILE_MAGIC           0x5145564d
#define QEMU_VM_FILE_VERSION         0x00000003
#define QEMU_VM_EOF                  0x00
#define QEMU_VM_SECTION_START        0x01
#define QEMU_VM_SECTION_PART         0x02
#define QEMU_VM_SECTION_END          0x03
#define QEMU_VM_SECTION_FULL         0x04
#define QEMU_VM_SUBSECTION           0x05
#define QEMU_VM_VMDESCRIPTION        0x06
#define QEMU_VM_CONFIGURATION        0x07
#define QEMU_VM_COMMAND              0x08
#define QEMU_VM_SECTION_FOOTER       0x7e
#define RAM_SAVE_FLAG_FULL     0x01 /* Obsolete, not used anymore */
#define RAM_SAVE_FLAG_ZERO     0x02
#define RAM_SAVE_FLAG_MEM_SIZE 0x04
#define RAM_SAVE_FLAG_PAGE     0x08
#define RAM_SAVE_FLAG_EOS      0x10
#define RAM_SAVE_FLAG_CONTINUE 0x20
#define RAM_SAVE_FLAG_XBZRLE   0x40
#define RAM_SAVE_FLAG_HOOK     0x80
#define RAM_SAVE_FLAG_COMPRESS_PAGE    0x100
#define RAM_SAVE_FLAG_MULTIFD_FLUSH    0x200
"""
#: register_savevm_live("ram", 0, 4, ...) and vmstate_configuration's subsections.
QEMU_NAMES = {
    "RAM_IDSTR": "ram",
    "RAM_INSTANCE_ID": 0,
    "RAM_VERSION_ID": 4,
    "SUBSECTION_TARGET_PAGE_BITS": "configuration/target-page-bits",
    "SUBSECTION_CAPABILITIES": "configuration/capabilities",
    "SUBSECTION_UUID": "configuration/uuid",
}


def qemu_values() -> dict[str, int | str]:
    values: dict[str, int | str] = {}
    for line in QEMU_DEFINES.strip().splitlines():
        _, name, value = line.split(maxsplit=3)[:3]
        values[name] = int(value, 16)
    return {**values, **QEMU_NAMES}


@pytest.mark.parametrize(("name", "value"), qemu_values().items())
def test_qemu_values(name: str, value: int | str) -> None:
    assert getattr(ms, name) == value
    assert name in ms.__all__


def test_flag_and_section_names() -> None:
    assert flag_names(0x22) == "ZERO|CONTINUE"
    assert flag_names(0x400 | 0x08) == "PAGE|0x400"
    assert flag_names(0) == "0"
    assert section_name(0x7E) == "SECTION_FOOTER" and section_name(0x42) == "0x42"
    assert section_name(0) == "EOF" and section_name(3) == "SECTION_END"
    assert section_name(ms.QEMU_VM_FILE_MAGIC) == "0x5145564d"  # not a section type
    flags = {name for name in qemu_values() if name.startswith("RAM_SAVE_FLAG_")}
    assert {f"RAM_SAVE_FLAG_{n}" for n in flag_names((1 << 10) - 1).split("|")} == flags


# --- golden bytes: the writer ---------------------------------------------------------------


def test_header_and_configuration_bytes() -> None:
    w = MainStreamWriter()
    w.header()
    assert w.pending() == 23
    assert w.take() == b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2"
    assert w.pending() == 0
    assert w.take() == b""


def test_other_machine_type_and_section_id() -> None:
    w = MainStreamWriter(machine_type="pc-i440fx-7.2", section_id=7)
    w.header()
    w.ram_setup([("pc.ram", 2 * PS)])
    w.eos()
    assert w.take() == (
        HEAD
        + b"\x07\x00\x00\x00\x0dpc-i440fx-7.2"
        + b"\x01\x00\x00\x00\x07\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
        + b"\x00\x00\x00\x00\x00\x00\x20\x04"
        + b"\x06pc.ram\x00\x00\x00\x00\x00\x00\x20\x00"
        + b"\x00\x00\x00\x00\x00\x00\x00\x10\x7e\x00\x00\x00\x07"
    )


def test_ram_setup_bytes_have_no_eos() -> None:
    w = MainStreamWriter()
    w.ram_setup([("pc.ram", 0x10000), ("vga", 0x2000)])
    assert w.take() == (
        b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
        + b"\x00\x00\x00\x00\x00\x01\x20\x04"
        + b"\x06pc.ram\x00\x00\x00\x00\x00\x01\x00\x00"
        + b"\x03vga\x00\x00\x00\x00\x00\x00\x20\x00"
    )


def test_records_continue_and_sections_bytes() -> None:
    w = MainStreamWriter()
    w.ram_setup([("pc.ram", 0x10000), ("vga", 0x2000)])
    w.eos()
    w.take()
    w.section_part()
    w.zero_page("pc.ram", 0x3000)
    w.zero_page("pc.ram", 0x4000, 0xAB)
    w.zero_page("vga", 0x1000)
    w.page("vga", 0x0, bytes(range(256)) * 16)
    w.page("pc.ram", 0xF000, b"\x5a" * PS)
    w.eos()
    w.section_end()
    w.zero_page("pc.ram", 0x5000)  # CONTINUE across the section boundary, as QEMU does
    w.eos()
    w.eof()
    assert w.take() == (
        b"\x02\x00\x00\x00\x02"
        + b"\x00\x00\x00\x00\x00\x00\x30\x02\x06pc.ram\x00"
        + b"\x00\x00\x00\x00\x00\x00\x40\x22\xab"
        + b"\x00\x00\x00\x00\x00\x00\x10\x02\x03vga\x00"
        + b"\x00\x00\x00\x00\x00\x00\x00\x28"
        + bytes(range(256)) * 16
        + b"\x00\x00\x00\x00\x00\x00\xf0\x08\x06pc.ram"
        + b"\x5a" * PS
        + b"\x00\x00\x00\x00\x00\x00\x00\x10\x7e\x00\x00\x00\x02"
        + b"\x03\x00\x00\x00\x02"
        + b"\x00\x00\x00\x00\x00\x00\x50\x22\x00"
        + b"\x00\x00\x00\x00\x00\x00\x00\x10\x7e\x00\x00\x00\x02"
        + b"\x00"
    )


def test_ram_setup_resets_continue() -> None:
    w = MainStreamWriter()
    w.ram_setup([("a", PS)])
    w.zero_page("a", 0)
    first = w.take()
    w2 = MainStreamWriter()
    w2.ram_setup([("a", PS)])
    w2.zero_page("a", 0)
    assert first == w2.take()
    assert first.endswith(be64(0x02) + b"\x01a\x00")


def test_zero_pages_equals_zero_page_calls() -> None:
    def make() -> MainStreamWriter:
        w = MainStreamWriter()
        w.ram_setup([("a", 64 * PS), ("b", 8 * PS)])
        w.take()
        return w

    one, many = make(), make()
    plan = [("a", [0, PS, 5 * PS]), ("a", [9 * PS]), ("b", [0, 7 * PS]), ("a", []), ("a", [PS])]
    for block, offsets in plan:
        for off in offsets:
            one.zero_page(block, off, 3)
        many.zero_pages(block, offsets, 3)
    assert many.take() == one.take()


def test_writer_misuse_raises_config_error() -> None:
    w = MainStreamWriter()
    with pytest.raises(ConfigError):
        w.zero_page("pc.ram", 0)  # before ram_setup
    with pytest.raises(ConfigError):
        w.section_part()  # before ram_setup
    for bad in ([("", PS)], [("a", 0)], [("a", PS + 1)], [("a", PS), ("a", PS)], [("a\0", PS)]):
        with pytest.raises(ConfigError):
            MainStreamWriter().ram_setup(bad)
    w.ram_setup([("pc.ram", 4 * PS)])
    with pytest.raises(ConfigError):
        w.ram_setup([("pc.ram", 4 * PS)])
    with pytest.raises(ConfigError):
        w.section_part()  # the START section is still open
    for block, offset in (("nope", 0), ("pc.ram", 1), ("pc.ram", 4 * PS), ("pc.ram", -PS)):
        with pytest.raises(ConfigError):
            w.zero_page(block, offset)
        with pytest.raises(ConfigError):
            w.zero_pages(block, [offset])
    with pytest.raises(ConfigError):
        w.zero_page("pc.ram", 0, 256)
    with pytest.raises(ConfigError):
        w.page("pc.ram", 0, b"short")
    with pytest.raises(ConfigError):
        w.eof()  # RAM not ended
    w.eos()
    with pytest.raises(ConfigError):
        w.eos()
    with pytest.raises(ConfigError):
        w.zero_page("pc.ram", 0)  # between sections
    w.section_end()
    w.eos()
    with pytest.raises(ConfigError):
        w.section_part()  # after the END section
    w.eof()
    with pytest.raises(ConfigError):
        MainStreamWriter(page_size=3000)
    with pytest.raises(ConfigError):
        MainStreamWriter(machine_type="")


# --- golden bytes: the parser ---------------------------------------------------------------


def test_parse_hand_built_stream() -> None:
    data = (
        PRE
        + part()
        + zero(0x3000, b"pc.ram")
        + zero(0x4000, None, 0xAB)
        + zero(0x1000, b"vga")
        + page(0x0, None, b"\x11" * PS)
        + eos()
        + part()
        + eos()
        + end()
        + zero(0xF000, b"pc.ram", 1)
        + eos()
        + b"\x00"
    )
    assert parse(data) == [
        *PRE_EVENTS,
        ZeroPage("pc.ram", 0x3000, 0),
        ZeroPage("pc.ram", 0x4000, 0xAB),
        ZeroPage("vga", 0x1000, 0),
        Page("vga", 0x0, b"\x11" * PS),
        RoundEnd(QEMU_VM_SECTION_PART, 1),
        RoundEnd(QEMU_VM_SECTION_PART, 2),
        ZeroPage("pc.ram", 0xF000, 1),
        RoundEnd(QEMU_VM_SECTION_END, 3),
        RamEnd(),
        Eof(),
        ConnectionEnd(),
    ]


def test_parse_qemu10_per_round_stream() -> None:
    """QEMU 10.0, pc-q35-10.0: a sync barrier at each FLUSH (the setup's, a pass's end amid a
    section's records, the completion's), none at the EOS records; SWITCHOVER_START before the
    END section."""
    data = (
        PRE10
        + part()
        + zero(0x3000, b"pc.ram")
        + flush()
        + zero(0x4000, None)
        + eos()
        + part()
        + eos()
        + SWITCHOVER_START
        + end()
        + flush()
        + eos()
        + b"\x00"
    )
    parser = MainStreamParser()
    assert parser.flush is None
    parser.feed(data)
    parser.feed_eof()
    events: list[MainEvent] = []
    assert drain(parser, events)
    assert events == [
        Header(3),
        Configuration("pc-q35-10.0", {}),
        RamBlocks((("pc.ram", 16 * PS), ("vga", 2 * PS)), 2),
        RoundEnd(QEMU_VM_SECTION_START, 0),
        ZeroPage("pc.ram", 0x3000, 0),
        RoundEnd(QEMU_VM_SECTION_PART, 1),
        ZeroPage("pc.ram", 0x4000, 0),
        Command(11),
        RoundEnd(QEMU_VM_SECTION_END, 2),
        RamEnd(),
        Eof(),
        ConnectionEnd(),
    ]
    assert parser.flush == ms.QEMU_FLUSH_PER_ROUND == "per-round"
    assert parser.commands == (ms.MIG_CMD_SWITCHOVER_START,)


def test_qemu7_stream_is_per_section() -> None:
    parser = MainStreamParser()
    parser.feed(PRE + end() + eos() + b"\x00")
    parser.feed_eof()
    events: list[MainEvent] = []
    assert drain(parser, events)
    assert events.count(RoundEnd(QEMU_VM_SECTION_END, 1)) == 1
    assert parser.flush == ms.QEMU_FLUSH_PER_SECTION == "per-section"
    assert parser.commands == ()


def test_flush_ends_a_batched_zero_run() -> None:
    run = zero(0, b"pc.ram") + zero(PS, None) + zero(2 * PS, None)
    data = PRE10 + part() + run + flush() + zero(3 * PS, None) + eos()
    events = parse(data, eof=False, batch_zero_pages=True)[4:]
    assert isinstance(events[0], ZeroPage) and isinstance(events[1], ZeroPages)
    assert events[1].offsets.tolist() == [PS, 2 * PS]  # the run stops at the FLUSH
    assert events[2] == RoundEnd(QEMU_VM_SECTION_PART, 1)
    assert isinstance(events[3], ZeroPages) and events[3].offsets.tolist() == [3 * PS]


def test_continue_across_sections_is_accepted() -> None:
    data = PRE + part() + zero(0, b"vga") + eos() + end() + zero(PS, None, 9) + eos() + b"\x00"
    events = parse(data)
    assert ZeroPage("vga", PS, 9) in events


def test_configuration_needs_the_following_byte() -> None:
    parser = MainStreamParser()
    parser.feed(HEAD + CONFIG)
    assert parser.next_event() == Header(3)
    assert parser.next_event() is NEED_DATA
    parser.feed(b"\x01")
    assert parser.next_event() == Configuration("pc-q35-7.2", {})
    assert parser.next_event() is NEED_DATA


def test_configuration_subsections() -> None:
    uuid = bytes(range(16))
    subs = (
        subsection(b"configuration/target-page-bits", be32(12))
        + subsection(b"configuration/capabilities", be32(2) + counted(b"foo") + counted(b"bar"))
        + subsection(b"configuration/uuid", uuid)
    )
    data = HEAD + config(subs=subs) + start() + block_list(BLOCKS) + eos()
    events = parse(data, eof=False)
    assert events[1] == Configuration(
        "pc-q35-7.2",
        {
            "configuration/target-page-bits": 12,
            "configuration/capabilities": ("foo", "bar"),
            "configuration/uuid": uuid,
        },
    )
    assert events[2:] == PRE_EVENTS[2:]


def test_configuration_is_optional() -> None:
    events = parse(HEAD + start() + block_list(BLOCKS) + eos(), eof=False)
    assert events == [PRE_EVENTS[0], *PRE_EVENTS[2:]]


def test_empty_block_list() -> None:
    events = parse(HEAD + CONFIG + start(sid=0) + block_list([]) + eos(0), eof=False)
    assert events[2:] == [RamBlocks((), 0), RoundEnd(QEMU_VM_SECTION_START, 0)]


def test_last_page_of_block_is_accepted() -> None:
    events = parse(PRE + part() + zero(15 * PS, b"pc.ram") + zero(PS, b"vga"), eof=False)
    assert events[-2:] == [ZeroPage("pc.ram", 15 * PS, 0), ZeroPage("vga", PS, 0)]


def test_eof_then_vm_description() -> None:
    tail = end() + eos() + b"\x00" + b"\x06" + be32(9) + b'{"a": 1}\n'
    events = parse(PRE + tail)
    assert events[-4:] == [RamEnd(), Eof(), VmDescription(b'{"a": 1}\n'), ConnectionEnd()]


QEMU_TAIL = (
    b"\x04\x00\x00\x00\x03\x05timer\x00\x00\x00\x00\x00\x00\x00\x02"
    + bytes(range(40))
    + b"\x7e\x00\x00\x00\x03\x00\x06\x00\x00\x00\x04{}{}"
)


def test_device_state_passes_through() -> None:
    data = PRE + end() + eos() + QEMU_TAIL
    events = merge_device_state(parse(data))
    assert events[-4:] == [
        RoundEnd(QEMU_VM_SECTION_END, 1),
        RamEnd(),
        DeviceState(QEMU_TAIL),
        ConnectionEnd(),
    ]


def test_device_state_chunks_arrive_as_fed() -> None:
    data = PRE + end() + eos() + QEMU_TAIL
    at = len(data) - len(QEMU_TAIL)
    events = parse(data, [at + 1, at + 10, at + 11])
    chunks = [ev.data for ev in events if isinstance(ev, DeviceState)]
    assert chunks == [QEMU_TAIL[:1], QEMU_TAIL[1:10], QEMU_TAIL[10:11], QEMU_TAIL[11:]]


def test_next_event_after_connection_end_repeats_it() -> None:
    parser = MainStreamParser()
    parser.feed(PRE + end() + eos() + b"\x00")
    parser.feed_eof()
    drain(parser, [])
    assert parser.next_event() == ConnectionEnd()
    with pytest.raises(ConfigError):
        parser.feed(b"x")


# --- round trips ----------------------------------------------------------------------------


def writer_stream(
    blocks: Sequence[tuple[str, int]],
    rounds: Sequence[Sequence[tuple[str, int, int, bytes | None]]],
    page_size: int = PS,
) -> tuple[bytes, list[MainEvent]]:
    """A stream from the writer plus the events it must parse to.

    ``rounds[:-1]`` are PART sections, ``rounds[-1]`` the END section; each record is
    (block, page index, fill, page data or None for a zero page).
    """
    w = MainStreamWriter(page_size=page_size, section_id=5)
    w.header()
    w.ram_setup(blocks)
    w.eos()
    expected: list[MainEvent] = [
        Header(3),
        Configuration("pc-q35-7.2", {}),
        RamBlocks(tuple(blocks), 5),
        RoundEnd(QEMU_VM_SECTION_START, 0),
    ]
    for i, records in enumerate(rounds):
        last = i == len(rounds) - 1
        w.section_end() if last else w.section_part()
        for block, index, fill, data in records:
            offset = index * page_size
            if data is None:
                w.zero_page(block, offset, fill)
                expected.append(ZeroPage(block, offset, fill))
            else:
                w.page(block, offset, data)
                expected.append(Page(block, offset, data))
        w.eos()
        expected.append(RoundEnd(QEMU_VM_SECTION_END if last else QEMU_VM_SECTION_PART, i + 1))
    w.eof()
    expected += [RamEnd(), Eof(), ConnectionEnd()]
    return w.take(), expected


SAMPLE_BLOCKS = [("pc.ram", 32 * PS), ("vga.vram", 4 * PS), ("/rom@etc/acpi/tables", PS)]
SAMPLE_ROUNDS: list[list[tuple[str, int, int, bytes | None]]] = [
    [("pc.ram", i, 0, None) for i in range(0, 32, 3)]
    + [("vga.vram", 1, 0xFF, None), ("vga.vram", 2, 0, b"\xc3" * PS), ("pc.ram", 5, 1, None)],
    [],
    [("/rom@etc/acpi/tables", 0, 0, None), ("pc.ram", 31, 0, b"\x00\x01" * (PS // 2))],
    [("vga.vram", 3, 0, None), ("vga.vram", 0, 0, None)],
]


def test_round_trip_several_blocks_and_rounds() -> None:
    data, expected = writer_stream(SAMPLE_BLOCKS, SAMPLE_ROUNDS)
    assert parse(data) == expected


def test_byte_by_byte_equals_all_at_once() -> None:
    data, expected = writer_stream(SAMPLE_BLOCKS, SAMPLE_ROUNDS)
    assert parse(data, range(1, len(data))) == parse(data) == expected


def test_byte_by_byte_with_device_state() -> None:
    data = PRE + part() + zero(0, b"vga") + eos() + end() + eos() + QEMU_TAIL
    whole = parse(data)
    assert merge_device_state(parse(data, range(1, len(data)))) == merge_device_state(whole)


def test_random_chunks_and_a_big_stream() -> None:
    rng = random.Random(5)
    blocks = [("pc.ram", 1024 * PS), ("vga", 16 * PS)]
    records: list[tuple[str, int, int, bytes | None]] = [
        ("pc.ram", i, 0, None) for i in range(1024)
    ]
    rounds = [[*records, ("vga", 3, 0, None)] for _ in range(3)]
    data, expected = writer_stream(blocks, rounds)
    cuts = sorted(rng.sample(range(1, len(data)), 200))
    assert parse(data, cuts) == expected


name_st = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=1, max_size=12
).filter(lambda s: len(s.encode()) <= 255)


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, list[tuple[str, int]], list[list[tuple]]]:
    page_size = draw(st.sampled_from([512, 1024, 4096]))
    names = draw(st.lists(name_st, min_size=1, max_size=4, unique=True))
    blocks = [(n, draw(st.integers(1, 8)) * page_size) for n in names]
    record = st.tuples(
        st.integers(0, len(blocks) - 1),
        st.integers(0, 7),
        st.integers(0, 255),
        st.booleans(),
    )
    rounds = draw(st.lists(st.lists(record, max_size=12), min_size=1, max_size=4))
    resolved = [
        [
            (
                blocks[b][0],
                i % (blocks[b][1] // page_size),
                fill,
                bytes([fill]) * page_size if is_page else None,
            )
            for b, i, fill, is_page in r
        ]
        for r in rounds
    ]
    return page_size, blocks, resolved


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_hypothesis_round_trip(
    stream: tuple[int, list[tuple[str, int]], list[list[tuple]]], data: st.DataObject
) -> None:
    page_size, blocks, rounds = stream
    raw, expected = writer_stream(blocks, rounds, page_size)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    assert parse(raw, cuts, page_size=page_size) == expected


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300).filter(lambda b: b[0] != 0), st.data())
def test_hypothesis_device_state_is_byte_exact(tail: bytes, data: st.DataObject) -> None:
    head = PRE + end() + eos()
    raw = head + tail
    cuts = data.draw(st.lists(st.integers(len(head), len(raw)), max_size=10))
    events = parse(raw, cuts)
    assert events[: len(PRE_EVENTS)] == PRE_EVENTS
    assert b"".join(ev.data for ev in events if isinstance(ev, DeviceState)) == tail
    assert events[-1] == ConnectionEnd()
    assert Eof() not in events


# --- validation rules -----------------------------------------------------------------------

CASES: list[tuple[str, bytes, type[MultiFDError], str]] = [
    ("bad magic", b"QEVN" + be32(3) + CONFIG, BadMagic, "magic"),
    ("bad version", b"QEVM" + be32(2) + CONFIG, BadVersion, "version 2"),
    (
        "unknown subsection",
        HEAD + config(subs=subsection(b"configuration/foo", b"")) + start(),
        MainStreamError,
        "unknown configuration subsection",
    ),
    (
        "subsection version",
        HEAD + config(subs=subsection(b"configuration/uuid", bytes(16), 2)) + start(),
        MainStreamError,
        "version 2",
    ),
    (
        "subsection twice",
        HEAD
        + config(
            subs=subsection(b"configuration/uuid", bytes(16)) * 2,
        )
        + start(),
        MainStreamError,
        "twice",
    ),
    (
        "target page bits",
        HEAD + config(subs=subsection(b"configuration/target-page-bits", be32(13))) + start(),
        MainStreamError,
        "page bits 13",
    ),
    (
        "x-ignore-shared",
        HEAD
        + config(subs=subsection(b"configuration/capabilities", be32(1) + b"\x0fx-ignore-shared"))
        + start(),
        MainStreamError,
        "x-ignore-shared",
    ),
    (
        "too many capabilities",
        HEAD + config(subs=subsection(b"configuration/capabilities", be32(10**6))),
        MainStreamError,
        "capabilities",
    ),
    ("empty machine", HEAD + config(b"") + start(), MainStreamError, "machine type length"),
    ("huge machine", HEAD + b"\x07" + be32(1 << 31), MainStreamError, "machine type length"),
    ("machine not utf-8", HEAD + config(b"\xff\xfe") + start(), MainStreamError, "UTF-8"),
    (
        "section other than ram first",
        HEAD + CONFIG + start(idstr=b"block"),
        MainStreamError,
        "before the RAM section",
    ),
    ("ram instance", HEAD + CONFIG + start(instance=1), MainStreamError, "instance 1"),
    ("ram version", HEAD + CONFIG + start(version=3), BadVersion, "RAM section version 3"),
    # before the RAM START section: OPEN_RETURN_PATH, then PINGs (the return-path capability)
    ("PING with no return path", HEAD + CONFIG + command(2, be32(1)), MainStreamError, "no return"),
    ("OPEN_RETURN_PATH twice", HEAD + CONFIG + command(1) * 2, MainStreamError, "twice"),
    ("PING of 2 bytes", HEAD + CONFIG + command(1) + command(2, b"ab"), MainStreamError, "PING"),
    ("POSTCOPY_ADVISE", HEAD + CONFIG + command(1) + command(3), MainStreamError, "POSTCOPY"),
    ("eof before ram", HEAD + CONFIG + b"\x00", MainStreamError, "EOF"),
    ("part before start", HEAD + CONFIG + part(), MainStreamError, "SECTION_PART"),
    ("unknown section type", HEAD + CONFIG + b"\x42", MainStreamError, "0x42"),
    (
        "first record not MEM_SIZE",
        HEAD + CONFIG + start() + zero(0, b"pc.ram"),
        MainStreamError,
        "not MEM_SIZE",
    ),
    (
        "MEM_SIZE with other flags",
        HEAD + CONFIG + start() + be64(PS | 0x04 | 0x01),
        MainStreamError,
        "not MEM_SIZE",
    ),
    (
        "total below sum",
        HEAD + CONFIG + start() + block_list(BLOCKS, total=17 * PS) + eos(),
        BlockMismatch,
        "exceeds",
    ),
    (
        # QEMU reads entries until the total is used up: the rest is taken as records.
        "total ends before the last block",
        HEAD + CONFIG + start() + block_list(BLOCKS, total=16 * PS) + eos(),
        MainStreamError,
        "bad RAM record flags",
    ),
    (
        "total above sum",
        HEAD + CONFIG + start() + block_list(BLOCKS, total=20 * PS) + eos(),
        BlockMismatch,
        "empty name",
    ),
    (
        "zero-sized block",
        HEAD + CONFIG + start() + block_list([(b"a", 0), (b"b", PS)]) + eos(),
        BlockMismatch,
        "size 0",
    ),
    (
        "unaligned block",
        HEAD + CONFIG + start() + block_list([(b"a", PS + 512), (b"b", PS - 512)]) + eos(),
        BlockMismatch,
        "multiple of the page size",
    ),
    (
        "duplicate block",
        HEAD + CONFIG + start() + block_list([(b"a", PS), (b"a", PS)]) + eos(),
        BlockMismatch,
        "twice",
    ),
    (
        "empty block name",
        HEAD + CONFIG + start() + block_list([(b"", PS)]) + eos(),
        BlockMismatch,
        "empty name",
    ),
    (
        "block name not utf-8",
        HEAD + CONFIG + start() + block_list([(b"\xc3(", PS)]) + eos(),
        BlockMismatch,
        "UTF-8",
    ),
    (
        "block name with NUL",
        HEAD + CONFIG + start() + block_list([(b"a\0b", PS)]) + eos(),
        BlockMismatch,
        "not a valid name",
    ),
    ("XBZRLE", PRE + part() + be64(0x40) + b"\x01a", MainStreamError, "XBZRLE"),
    ("COMPRESS_PAGE", PRE + part() + be64(0x100) + b"\x00", MainStreamError, "COMPRESS_PAGE"),
    ("MULTIFD_FLUSH", PRE + part() + be64(0x200), MainStreamError, "MULTIFD_FLUSH"),
    # a per-section stream (no FLUSH before the setup's EOS) never has a FLUSH: QEMU's loader
    # would wait at it for a sync the source does not send
    ("FLUSH, per-section", PRE + part() + flush(), MainStreamError, "syncs at each EOS"),
    ("FLUSH at the end, per-section", PRE + end() + flush(), MainStreamError, "MULTIFD_FLUSH"),
    ("FLUSH with an offset", PRE10 + part() + be64(PS | 0x200), MainStreamError, "offset 0x1000"),
    ("FLUSH|CONTINUE", PRE10 + part() + be64(0x220), MainStreamError, "bad MULTIFD_FLUSH"),
    ("FLUSH|ZERO", PRE10 + part() + be64(0x202), MainStreamError, "ZERO|MULTIFD_FLUSH"),
    ("FLUSH in the block list", HEAD + CONFIG + start() + flush(), MainStreamError, "not MEM_SIZE"),
    (
        "SWITCHOVER_START with data",
        PRE10 + part() + eos() + command(11, b"x"),
        MainStreamError,
        "MIG_CMD_SWITCHOVER_START (length 1)",
    ),
    (
        "OPEN_RETURN_PATH between sections",
        PRE10 + part() + eos() + command(1),
        MainStreamError,
        "MIG_CMD_OPEN_RETURN_PATH",
    ),
    ("unknown command", PRE + command(99), MainStreamError, "command 99"),
    ("command before the RAM START", HEAD + CONFIG + command(11), MainStreamError, "COMMAND"),
    (
        "command after RAM END",
        PRE10 + end() + flush() + eos() + b"\x00" + command(11),
        MainStreamError,
        "after QEMU_VM_EOF",
    ),
    ("HOOK", PRE + part() + be64(0x80), MainStreamError, "HOOK"),
    ("XBZRLE with ZERO", PRE + part() + be64(0x42) + b"\x00", MainStreamError, "XBZRLE"),
    ("ZERO and PAGE", PRE + part() + be64(0x0A) + b"\x01a", MainStreamError, "ZERO|PAGE"),
    ("no flags", PRE + part() + be64(PS), MainStreamError, "bad RAM record flags"),
    ("unknown flag bit", PRE + part() + be64(0x400 | 0x02), MainStreamError, "0x400"),
    ("MEM_SIZE later", PRE + part() + block_list(BLOCKS), MainStreamError, "MEM_SIZE"),
    ("CONTINUE first", PRE + part() + zero(0, None), MainStreamError, "no previous block"),
    (
        "PAGE CONTINUE first",
        PRE + part() + page(0, None, bytes(PS)),
        MainStreamError,
        "no previous block",
    ),
    ("unknown block", PRE + part() + zero(0, b"pc.rom"), UnknownBlock, "pc.rom"),
    (
        "unknown block not utf-8",
        PRE + part() + zero(0, b"\xff"),
        UnknownBlock,
        "unknown RAM block",
    ),
    ("offset past block", PRE + part() + zero(16 * PS, b"pc.ram"), BadOffset, "0x10000"),
    (
        "offset past block, CONTINUE",
        PRE + part() + zero(0, b"vga") + zero(2 * PS, None),
        BadOffset,
        "vga",
    ),
    (
        "page offset past block",
        PRE + part() + page(1 << 40, b"vga", bytes(PS)),
        BadOffset,
        "vga",
    ),
    ("EOS with offset", PRE + part() + be64(PS | 0x10) + eos()[8:], MainStreamError, "EOS"),
    ("EOS with CONTINUE", PRE + part() + be64(0x30) + eos()[8:], MainStreamError, "EOS"),
    ("missing footer", PRE + part() + be64(0x10) + part(), MainStreamError, "footer"),
    ("footer id", PRE + part() + eos(sid=3), MainStreamError, "footer id 3"),
    (
        "setup footer id",
        HEAD + CONFIG + start() + block_list(BLOCKS) + eos(9),
        MainStreamError,
        "id 9",
    ),
    ("part of another section", PRE + part(sid=3), MainStreamError, "section id 3"),
    ("full section before ram end", PRE + b"\x04" + be32(3), MainStreamError, "SECTION_FULL"),
    ("second start", PRE + start(), MainStreamError, "SECTION_START"),
    ("eof before ram end", PRE + part() + eos() + b"\x00", MainStreamError, "EOF"),
    # a QEMU_VM_COMMAND between RAM sections: only MIG_CMD_SWITCHOVER_START is read there
    ("command mid-ram", PRE + b"\x08\0\x01\0\0", MainStreamError, "COMMAND"),
    ("after eof", PRE + end() + eos() + b"\x00\x04", MainStreamError, "after QEMU_VM_EOF"),
    (
        "after vmdesc",
        PRE + end() + eos() + b"\x00\x06" + be32(2) + b"{}" + b"\x00",
        MainStreamError,
        "after the VM description",
    ),
    (
        "huge vmdesc",
        PRE + end() + eos() + b"\x00\x06" + be32(0xFFFFFFFF),
        MainStreamError,
        "VM description",
    ),
]


@pytest.mark.parametrize(
    ("data", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validation(data: bytes, error: type[MultiFDError], match: str) -> None:
    exc = parse_error(data)
    assert type(exc) is error
    assert match in str(exc)


def test_too_many_blocks() -> None:
    data = HEAD + CONFIG + start() + block_list(BLOCKS) + eos()
    assert parse(data, eof=False, max_blocks=2) == PRE_EVENTS
    exc = parse_error(data, max_blocks=1)
    assert type(exc) is LimitExceeded
    assert "more than 1 RAM blocks" in str(exc)


def test_max_device_state() -> None:
    data = PRE + end() + eos() + QEMU_TAIL
    assert parse(data, max_device_state=len(QEMU_TAIL))[-1] == ConnectionEnd()
    exc = parse_error(data, max_device_state=len(QEMU_TAIL) - 1)
    assert type(exc) is MainStreamError
    assert "device state" in str(exc)
    vmdesc = PRE + end() + eos() + b"\x00\x06" + be32(10) + b"0123456789"
    assert parse(vmdesc, max_device_state=10)[-2] == VmDescription(b"0123456789")
    assert type(parse_error(vmdesc, max_device_state=9)) is MainStreamError


def test_bad_magic_is_seen_before_the_whole_header() -> None:
    parser = MainStreamParser()
    parser.feed(b"QE")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"X")
    with pytest.raises(BadMagic):
        parser.next_event()


def test_errors_come_before_feed_eof() -> None:
    parser = MainStreamParser()
    parser.feed(PRE + part() + zero(0, b"nope"))
    with pytest.raises(UnknownBlock):
        drain(parser, [])


def test_failed_parser_stays_failed() -> None:
    parser = MainStreamParser()
    parser.feed(PRE + part() + zero(0, b"nope"))
    with pytest.raises(UnknownBlock) as info:
        drain(parser, [])
    parser.feed(part())
    for _ in range(2):
        with pytest.raises(UnknownBlock) as again:
            parser.next_event()
        assert again.value is info.value


def test_page_size_changes_the_flag_mask() -> None:
    # With 64 KiB pages, 0x1000 is below the page mask: an unknown flag, not an offset.
    data = HEAD + CONFIG + start() + block_list([(b"a", 1 << 16)]) + eos() + part()
    assert parse(data + zero(0, b"a"), eof=False, page_size=1 << 16)[-1] == ZeroPage("a", 0, 0)
    exc = parse_error(data + zero(0x1000, b"a"), page_size=1 << 16)
    assert "0x1000" in str(exc)
    assert parse(PRE + part() + zero(0x1000, b"vga"), eof=False)[-1] == ZeroPage("vga", PS, 0)


def test_parser_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        MainStreamParser(page_size=1000)
    with pytest.raises(ConfigError):
        MainStreamParser(max_device_state=-1)


# --- the state table ------------------------------------------------------------------------


def test_state_table_is_complete() -> None:
    assert set(HANDLERS) == set(TRANSITIONS) == set(State)
    seen, todo = {State.HEADER}, [State.HEADER]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(State)  # every state is reachable from the header
    assert {s for s, after in TRANSITIONS.items() if not after} == {State.DONE}
    # QEMU's device state ends at the input's end, or (return path) at its VM description
    assert TRANSITIONS[State.DEVICE_STATE] == {State.DONE}


def test_goto_refuses_a_transition_the_table_does_not_list() -> None:
    ctx = ParseContext(
        HANDLERS, page_size=PS, max_blocks=1, max_device_state=None, batch_zero_pages=False
    )
    with pytest.raises(AssertionError, match=r"no transition State\.HEADER -> State\.RECORDS$"):
        ctx.goto(State.RECORDS)
    assert ctx.state is State.HEADER and ctx.handler is HANDLERS[State.HEADER]
    assert ctx.goto(State.AFTER_HEADER, Eof()) == Eof()
    assert ctx.state is State.AFTER_HEADER and ctx.handler is HANDLERS[State.AFTER_HEADER]


@pytest.mark.parametrize("batch", [False, True])
def test_streams_walk_the_table(batch: bool) -> None:
    data, _ = writer_stream(SAMPLE_BLOCKS, SAMPLE_ROUNDS)
    qemu10 = PRE10 + part() + flush() + eos() + SWITCHOVER_START + end() + flush() + eos()
    for stream in (
        data,
        PRE + part() + zero(0, b"vga") + eos() + end() + eos() + QEMU_TAIL,
        qemu10 + QEMU_TAIL,
    ):
        parser = MainStreamParser(batch_zero_pages=batch)
        states = [parser.state]
        for i in range(len(stream)):
            parser.feed(stream[i : i + 1])
            while parser.next_event() is not NEED_DATA:
                states.append(parser.state)
            states.append(parser.state)
        parser.feed_eof()
        assert parser.next_event() == ConnectionEnd()
        for before, after in itertools.pairwise(states):
            assert after == before or after in TRANSITIONS[before]
        assert states[-1] in (State.AFTER_EOF, State.DEVICE_STATE)


def test_a_record_kind_is_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # what the next QEMU dialect does (QEMU 8.1's RAM_SAVE_FLAG_MULTIFD_FLUSH): a row, a reader
    data = PRE + part() + zero(0, b"vga") + be64(0x200) + zero(PS, None) + eos()
    assert "MULTIFD_FLUSH" in str(parse_error(data))

    def flush(ctx: ParseContext, flags: int, offset: int) -> RoundEnd:
        ctx.pos += 8
        return RoundEnd(flags, offset)  # stands in for the dialect's own event

    monkeypatch.setitem(RECORD_READERS, 0x200, flush)  # type: ignore[index]
    assert parse(data, eof=False)[len(PRE_EVENTS) :] == [
        ZeroPage("vga", 0, 0),
        RoundEnd(0x200, 0),
        ZeroPage("vga", PS, 0),
        RoundEnd(QEMU_VM_SECTION_PART, 1),
    ]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"QEV", "header"),
        (HEAD + CONFIG, "after header"),
        (HEAD + CONFIG + start()[:3], "setup section"),
        (HEAD + CONFIG + start(), "mem size"),
        (HEAD + CONFIG + start() + block_list(BLOCKS)[:12], "block entry"),
        (PRE + part() + zero(0, b"vga")[:5], "records"),
        (PRE + part() + eos()[:10], "footer"),
        (PRE + b"\x02", "next section"),
        (PRE + end() + eos(), "after ram"),
        (PRE + end() + eos() + b"\x00\x06", "after eof"),
    ],
)
def test_truncation_names_the_state(data: bytes, where: str) -> None:
    exc = parse_error(data)
    assert type(exc) is TruncatedStream
    assert str(exc).startswith(f"main stream truncated in {where} (")


# --- truncation and garbage -----------------------------------------------------------------


def test_every_truncation_raises_at_feed_eof() -> None:
    data, _ = writer_stream(
        [("pc.ram", 8 * 512), ("vga", 2 * 512)],
        [[("pc.ram", 1, 0, None), ("pc.ram", 2, 0, None), ("vga", 1, 3, b"\x07" * 512)], []],
        page_size=512,
    )
    for cut in range(len(data)):
        parser = MainStreamParser(page_size=512)
        parser.feed(data[:cut])
        drain(parser, [])  # no error while more bytes may come
        parser.feed_eof()
        with pytest.raises(MainStreamError, match="truncated"):
            drain(parser, [])
    assert parse(data, page_size=512)[-1] == ConnectionEnd()


def test_truncated_vm_description_raises() -> None:
    data = PRE + end() + eos() + b"\x00\x06" + be32(4) + b"{}{}"
    at = len(data) - 9  # right after QEMU_VM_EOF
    assert parse(data[:at])[-2:] == [Eof(), ConnectionEnd()]
    for cut in range(at + 1, len(data)):
        with pytest.raises(MainStreamError, match="truncated"):
            parse(data[:cut])


def test_nothing_after_ram_end_is_truncated() -> None:
    with pytest.raises(MainStreamError, match="truncated"):
        parse(PRE + end() + eos())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_multifd_errors(data: bytes) -> None:
    for prefix in (b"", HEAD, PRE, PRE + part()):
        try:
            parse(prefix + data, max_device_state=64)
        except MultiFDError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_streams_raise_only_multifd_errors(data: st.DataObject) -> None:
    raw = bytearray(
        PRE
        + part()
        + zero(0, b"pc.ram")
        + zero(PS, None, 2)
        + page(0, b"vga", b"\x01" * PS)
        + eos()
        + end()
        + eos()
        + b"\x00\x06"
        + be32(2)
        + b"{}"
    )
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if op == "set":
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at : at + data.draw(st.integers(1, 8))]
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=5))
    try:
        parse(bytes(raw), cuts, max_device_state=1 << 16)
    except MultiFDError:
        pass


# --- batched zero records (what the destination uses) -----------------------------------------


def expand(events: list[MainEvent]) -> list[MainEvent]:
    out: list[MainEvent] = []
    for ev in events:
        out.extend(ev.expand() if isinstance(ev, ZeroPages) else [ev])
    return out


def outcome(data: bytes, cuts: Sequence[int], **kw: Any) -> tuple[list[MainEvent], str | None]:
    """Events (batches expanded) until the end or the first error, and that error's type."""
    parser = MainStreamParser(**kw)
    out: list[MainEvent] = []
    last = 0
    try:
        for cut in [*sorted(set(cuts)), len(data)]:
            parser.feed(data[last:cut])
            last = cut
            drain(parser, out)
        parser.feed_eof()
        drain(parser, out)
    except MultiFDError as exc:
        return expand(out), type(exc).__name__
    return expand(out), None


def test_batched_zero_records_equal_single_ones() -> None:
    rng = random.Random(8)
    blocks = [("pc.ram", 4096 * PS), ("vga", 16 * PS)]
    rounds = [
        [("pc.ram", i, 0, None) for i in range(4096)] + [("vga", 3, 0, None)],
        [("pc.ram", i, 7 if i % 50 == 0 else 0, None) for i in range(0, 4096, 3)],
    ]
    data, expected = writer_stream(blocks, rounds)
    for cuts in ([], sorted(rng.sample(range(1, len(data)), 300))):
        events = parse(data, cuts, batch_zero_pages=True)  # type: ignore[arg-type]
        assert any(isinstance(ev, ZeroPages) and len(ev.offsets) > 100 for ev in events)
        assert expand(events) == expected


def test_batched_zero_run_stops_at_a_bad_offset() -> None:
    data = PRE + part() + zero(0, b"pc.ram") + zero(PS, None) + zero(2 * PS, None)
    data += zero(1 << 40, None) + zero(3 * PS, None)
    events, error = outcome(data, [], batch_zero_pages=True)
    assert error == "BadOffset"
    assert events == outcome(data, [])[0]
    assert [ev.offset for ev in events if isinstance(ev, ZeroPage)] == [0, PS, 2 * PS]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_hypothesis_batched_equals_single(
    stream: tuple[int, list[tuple[str, int]], list[list[tuple]]], data: st.DataObject
) -> None:
    page_size, blocks, rounds = stream
    raw, expected = writer_stream(blocks, rounds, page_size)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    assert outcome(raw, cuts, page_size=page_size, batch_zero_pages=True) == (expected, None)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hypothesis_mutated_batched_equals_single(data: st.DataObject) -> None:
    raw = bytearray(
        PRE + part() + zero(0, b"pc.ram") + b"".join(zero(i * PS, None) for i in range(1, 15))
    )
    raw += page(0, b"vga", b"\x01" * PS) + eos() + end() + eos()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=5))
    assert outcome(bytes(raw), cuts, batch_zero_pages=True) == outcome(bytes(raw), cuts)
