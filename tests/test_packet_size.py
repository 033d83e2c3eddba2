"""Packets larger (or smaller) than QEMU's 128 pages between our own ends (issue 15).

A source's ``packet_size`` other than QEMU's MULTIFD_PACKET_SIZE is announced in each init
packet (the multifd-py extension's MULTIFD_EXT_PACKET_PAGES, docs/wire-extensions.md); a
destination of ours takes packets of that many pages, up to its ``max_packet_size``, and sizes
its headers and buffers from it. QEMU's size announces nothing (QEMU's own bytes), and QEMU
peers keep 128 pages (qemu_restore sends QEMU's size: tests/test_qemu*.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from fault_streams import Recorder, counting

from multifd_core import RAMBlock, SourceOptions
from multifd_core.errors import BadPagesAlloc, ConfigError, LimitExceeded
from multifd_core.extension import (
    MAX_PACKET_PAGES,
    MULTIFD_EXT_PACKET_CHECKSUM,
    MULTIFD_EXT_PACKET_PAGES,
)
from multifd_core.image import vm_like_image
from multifd_core.options import DEFAULT_PACKET_SIZE, DestinationOptions
from multifd_core.testing import run_loopback
from multifd_core.wire import (
    MULTIFD_INIT_SIZE,
    MULTIFD_PACKET_SIZE,
    MultiFDInit,
    decode_init,
    packet_header_size,
)

PS = 4096


def packets(chan: bytearray, pages: int) -> list[tuple[int, int, int]]:
    """(pages_alloc, normal_pages, zero_pages) of each packet on a recorded channel whose
    headers have room for ``pages`` offsets."""
    header = packet_header_size(pages)
    out, pos = [], MULTIFD_INIT_SIZE
    while pos < len(chan):
        head = chan[pos : pos + header]
        alloc, normal = (int.from_bytes(head[i : i + 4], "big") for i in (12, 16))
        out.append((alloc, normal, int.from_bytes(head[32:36], "big")))
        pos += header + int.from_bytes(head[20:24], "big")
    assert pos == len(chan)
    return out


def test_init_announces_packet_pages() -> None:
    init = MultiFDInit(2, features=MULTIFD_EXT_PACKET_PAGES, packet_pages=512).encode()
    assert init[32:44] == b"MFPY\0\1\0\2" + (512).to_bytes(4, "big")
    assert decode_init(init, num_channels=4).packet_pages == 512
    both = MULTIFD_EXT_PACKET_PAGES | MULTIFD_EXT_PACKET_CHECKSUM
    assert decode_init(MultiFDInit(0, features=both, packet_pages=7).encode(), num_channels=1)
    # without the feature bit, the bytes are not read: QEMU's zeros, or the checksum alone
    plain = MultiFDInit(0, features=MULTIFD_EXT_PACKET_CHECKSUM).encode()
    assert decode_init(plain, num_channels=1).packet_pages == 0
    assert decode_init(plain[:40] + b"\xff" * 4 + plain[44:], num_channels=1).packet_pages == 0


@pytest.mark.parametrize("pages", [0, MAX_PACKET_PAGES + 1, 0xFFFFFFFF])
def test_init_with_bad_packet_pages_refused(pages: int) -> None:
    good = MultiFDInit(1, features=MULTIFD_EXT_PACKET_PAGES, packet_pages=4).encode()
    bad = good[:40] + pages.to_bytes(4, "big") + good[44:]
    with pytest.raises(BadPagesAlloc, match=f"channel 1: packets of {pages} pages announced"):
        decode_init(bad, num_channels=2)
    with pytest.raises(ConfigError, match="packet_pages"):
        MultiFDInit(1, features=MULTIFD_EXT_PACKET_PAGES, packet_pages=pages).encode()


@pytest.mark.parametrize("value", [0, -1, (64 << 20) + 1, 2.5, True])
def test_packet_size_options_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="packet_size"):
        SourceOptions(packet_size=value)
    with pytest.raises(ConfigError, match="max_packet_size"):
        DestinationOptions(max_packet_size=value)


@pytest.mark.parametrize(
    "packet_size,pages",
    [
        (DEFAULT_PACKET_SIZE, DEFAULT_PACKET_SIZE // PS),
        (MULTIFD_PACKET_SIZE, 128),
        (64 << 10, 16),  # smaller than QEMU's: announced too
        (PS + 100, 1),  # whole pages only
    ],
)
async def test_packets_of_the_announced_size(packet_size: int, pages: int) -> None:
    """A VM-like block (zero pages in the packets' lists) in two rounds: every packet has room
    for the announced pages and full ones hold that many; the copy is exact."""
    data = bytearray(vm_like_image(4 << 20, PS, seed=3))
    got: list[bytearray] = []
    run = await run_loopback(
        [RAMBlock("ram", data)],
        rounds=2,
        source={"channels": 2, "packet_size": packet_size, "zero_page_detection": "multifd"},
        destination={"channels": 2},
        wrap_connect=counting(lambda n, s: Recorder(s, got)),
        timeout=30,
    )
    assert run.dst_blocks["ram"].host == data
    for chan in got[1:]:
        init = decode_init(bytes(chan[:MULTIFD_INIT_SIZE]), num_channels=2)
        announced = pages != 128
        assert bool(init.features & MULTIFD_EXT_PACKET_PAGES) == announced
        assert init.packet_pages == (pages if announced else 0)
        seen = packets(chan, pages)
        assert {alloc for alloc, _, _ in seen} == {pages}
        assert max(n + z for _, n, z in seen) == pages  # full packets hold all of it
        assert all(n + z <= pages for _, n, z in seen)


async def test_destination_refuses_packets_beyond_its_limit() -> None:
    """A channel announcing more than ``max_packet_size`` fails the migration on both ends,
    naming the channel and the limit; QEMU's size is always taken."""
    block = RAMBlock("ram", bytearray(vm_like_image(1 << 20, PS, seed=4)))
    run = await run_loopback(
        [block],
        source={"packet_size": 4 << 20},
        destination={"max_packet_size": 1 << 20},
        capture_errors=True,
        close_on_error=True,
        timeout=30,
    )
    assert isinstance(run.dst_error, LimitExceeded), run.dst_error
    assert str(run.dst_error).startswith("channel ")
    assert "packets of 1024 pages (4194304 bytes) announced, above max_packet_size 1048576" in (
        str(run.dst_error)
    )
    assert run.src_error is not None
    ok = await run_loopback(
        [block],
        source={"packet_size": MULTIFD_PACKET_SIZE},
        destination={"max_packet_size": 4096},
        timeout=30,
    )
    assert ok.dst_blocks["ram"].host == block.host
