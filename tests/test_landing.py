"""landing.py: zero records, whole pages and pwrite into a destination block, and the
written-page bookkeeping of ``known_zero`` blocks."""

from __future__ import annotations

import pytest

from multifd_core import RAMBlock, landing

PS = 4096


@pytest.mark.parametrize("fresh", [True, False])
def test_fill_page_zeroes_written_pages(fresh: bool) -> None:
    b = RAMBlock.allocate("ram", 8 * PS) if fresh else RAMBlock("ram", bytearray(8 * PS))
    landing.mark_written(b, [PS])
    b.host[PS : 2 * PS] = b"\x07" * PS
    landing.fill_page(b, PS)  # a page that held data, then a zero record: must become zero
    assert b.host[PS : 2 * PS].tobytes() == bytes(PS)
    landing.fill_page(b, 3 * PS, fill=0xAB)  # QEMU's fill byte
    assert b.host[3 * PS : 4 * PS].tobytes() == b"\xab" * PS
    landing.fill_page(b, 3 * PS)
    assert b.host[3 * PS : 4 * PS].tobytes() == bytes(PS)


def test_from_file_known_zero_only_when_new(tmp_path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"\x01" * (4 * PS))
    b = RAMBlock.from_file("img", path, 4 * PS)
    landing.fill_page(b, 0)  # an existing file's page is tested, not assumed zero
    assert b.host[:PS].tobytes() == bytes(PS)
    assert b.host[PS : 2 * PS].tobytes() == b"\x01" * PS
    b.close()


@pytest.mark.parametrize("known_zero", [True, False])
def test_fill_pages_matches_fill_page(known_zero: bool) -> None:
    import numpy as np

    npages = 64
    pattern = bytes(range(256)) * (npages * PS // 256)
    blocks = []
    for _ in range(2):
        b = (
            RAMBlock.allocate("ram", npages * PS)
            if known_zero
            else RAMBlock("ram", bytearray(npages * PS))
        )
        written = [1, 2, 3, 10, 40, 63]
        for page in written:
            b.host[page * PS : (page + 1) * PS] = pattern[:PS]
        landing.mark_written(b, [p * PS for p in written])
        blocks.append(b)
    offsets = np.array([p * PS for p in (0, 2, 3, 7, 40, 41, 63, 5)], dtype=np.uint64)
    fills = np.array([0, 0, 0, 0, 0, 0, 0, 9], dtype=np.uint8)
    one, many = blocks
    for off, fill in zip(offsets.tolist(), fills.tolist(), strict=True):
        landing.fill_page(one, off, fill)
    landing.fill_pages(many, offsets, fills)
    assert one.host.tobytes() == many.host.tobytes()
    assert many.host[PS : 2 * PS].tobytes() == pattern[:PS]  # not in the list: untouched
    assert not any(many.host[2 * PS : 4 * PS].tobytes())
    assert many.host[5 * PS : 6 * PS].tobytes() == bytes([9]) * PS


def test_write_spans_through_the_file(tmp_path) -> None:
    b = RAMBlock.from_file("ram", tmp_path / "ram.img", 8 * PS, create=True)
    try:
        assert b.fd is not None
        spans = b.spans([0, PS, 4 * PS, 6 * PS, 7 * PS])
        assert spans == [(0, 2 * PS), (4 * PS, 5 * PS), (6 * PS, 8 * PS)]
        views = [memoryview(bytes([i + 1]) * (end - start)) for i, (start, end) in enumerate(spans)]
        landing.write_spans(b, spans, views)
        # pwrite and the shared mapping see the same page cache
        assert b.host[0 : 2 * PS].tobytes() == b"\1" * 2 * PS
        assert b.host[2 * PS : 4 * PS].tobytes() == bytes(2 * PS)
        assert b.host[6 * PS :].tobytes() == b"\3" * 2 * PS
    finally:
        b.close()
    assert b.fd is None
    assert (tmp_path / "ram.img").read_bytes()[4 * PS : 5 * PS] == b"\2" * PS
