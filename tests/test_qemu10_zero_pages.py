"""Zero pages listed in packets (QEMU 9.0+ ``zero-page-detection=multifd``): landing.zero_fill,
and the whole destination taking a hand-built QEMU 10.0 migration (MULTIFD_FLUSH barriers, zero
pages in packets, SWITCHOVER_START) over memory streams.

No QEMU here; the real QEMU 10.0 captures are in test_qemu10_save.py.
"""

from __future__ import annotations

import pytest
import trio

from multifd_core import MemoryNetwork, RAMBlock, landing, open_destination
from multifd_core import mainstream as ms
from multifd_core.mainstream import MainStreamWriter
from multifd_core.wire import MULTIFD_FLAG_SYNC, MultiFDInit, MultiFDPacket

PS = 4096
FLUSH = ms.RAM_SAVE_FLAG_MULTIFD_FLUSH.to_bytes(8, "big")
#: QEMU_VM_COMMAND, be16 MIG_CMD_SWITCHOVER_START, be16 length 0
SWITCHOVER_START = bytes([ms.QEMU_VM_COMMAND, 0, ms.MIG_CMD_SWITCHOVER_START, 0, 0])


@pytest.mark.parametrize("fresh", [True, False])
def test_zero_fill_zeroes_listed_pages_only(fresh: bool) -> None:
    block = RAMBlock.allocate("ram", 16 * PS) if fresh else RAMBlock("ram", bytearray(16 * PS))
    for page in (1, 2, 5):
        block.host[page * PS : (page + 1) * PS] = bytes([page]) * PS
        landing.mark_written(block, [page * PS])
    landing.zero_fill(block, (PS, 5 * PS, 9 * PS))  # 9 was never written
    assert block.host[PS : 2 * PS].tobytes() == bytes(PS)
    assert block.host[5 * PS : 6 * PS].tobytes() == bytes(PS)
    assert block.host[2 * PS : 3 * PS].tobytes() == b"\x02" * PS  # not listed: kept
    if block.written is not None:  # the written-page rule: zeroed pages are no longer written
        assert [block.written.test(i) for i in (1, 2, 5, 9)] == [False, True, False, False]
    landing.zero_fill(block, ())  # nothing listed: nothing to do


def test_zero_fill_of_a_file_block(tmp_path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"\x03" * (4 * PS))  # an existing file: its pages are tested, not assumed
    block = RAMBlock.from_file("img", path, 4 * PS)
    landing.zero_fill(block, (0, 3 * PS))
    block.close()
    data = path.read_bytes()
    assert data[:PS] == bytes(PS) and data[3 * PS :] == bytes(PS)
    assert data[PS : 3 * PS] == b"\x03" * (2 * PS)


# --- a whole destination, fed what a QEMU 10.0 source sends ------------------------------

BLOCK = "pc.ram"
SIZE = 8 * PS


def qemu10_main_stream() -> bytes:
    """pc-q35-10.0's main stream: the setup, one PART and the END section, each with a FLUSH
    (the barrier) before its EOS, SWITCHOVER_START before the END, then EOF."""
    w = MainStreamWriter(machine_type="pc-q35-10.0")
    w.header()
    w.ram_setup([(BLOCK, SIZE)])
    out = w.take() + FLUSH
    for open_section in (w.section_part, w.section_end):
        w.eos()
        out += w.take()
        if open_section == w.section_end:
            out += SWITCHOVER_START
        open_section()
        out += w.take() + FLUSH
    w.eos()
    w.eof()
    return out + w.take()


def packets(channel: int) -> bytes:
    """Channel 0: page 1 in round 1, then its zero page in round 2; channel 1: pages 2 and 3 in
    round 1, page 3 a zero page in round 2. A SYNC on each channel per barrier (3)."""
    sync = MultiFDPacket(MULTIFD_FLAG_SYNC, 0, 0, 0, 0).encode(128, zero_pages_field=True)
    pages = {0: ((PS,), (PS,)), 1: ((2 * PS, 3 * PS), (3 * PS,))}[channel]
    out = MultiFDInit(channel).encode() + sync
    normal = MultiFDPacket(0, 128, len(pages[0]), len(pages[0]) * PS, 1, BLOCK, pages[0])
    out += normal.encode(zero_pages_field=True) + bytes([0x10 + channel]) * (len(pages[0]) * PS)
    out += sync
    zeros = MultiFDPacket(0, 128, 0, 0, 2, BLOCK, pages[1], zero_pages=len(pages[1]))
    return out + zeros.encode(zero_pages_field=True) + sync


@pytest.mark.parametrize("zero_page_packets", [True, False])
async def test_destination_takes_a_qemu10_migration(zero_page_packets: bool) -> None:
    net = MemoryNetwork()

    async def send(data: bytes) -> None:
        stream = await net.connect()
        await stream.send_all(data)
        await stream.aclose()

    async with open_destination(net.accept, channels=2, zero_page_packets=zero_page_packets) as dst:
        async with trio.open_nursery() as nursery:
            for data in (qemu10_main_stream(), packets(0), packets(1)):
                nursery.start_soon(send, data)
        stats = await dst.wait()
    host = dst.blocks[BLOCK].host
    page = [host[i * PS : (i + 1) * PS].tobytes() for i in range(4)]
    assert page[2] == b"\x11" * PS
    if zero_page_packets:  # round 2's zero pages landed after round 1's data (the FLUSH barrier)
        assert page[1] == page[3] == bytes(PS)
        assert stats.zero_pages == 2
    else:  # bytes 32..35 read as QEMU 7.2's unused[]: the packets carry nothing
        assert (page[1], page[3]) == (b"\x10" * PS, b"\x11" * PS)
    assert dst.flush == "per-round" and dst.commands == [ms.MIG_CMD_SWITCHOVER_START]
    assert stats.rounds == 2  # the PART's and the END's FLUSH; the setup's is no round
