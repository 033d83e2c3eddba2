"""RAM blocks: dirty tracking, zero pages, runs, file-backed blocks."""

from __future__ import annotations

import pytest

from multifd_core import RAMBlock
from multifd_core.errors import ConfigError
from multifd_core.ram import iter_dirty

PS = 4096


def test_dirty_tracking_and_sync() -> None:
    b = RAMBlock("ram", bytearray(16 * PS))
    b.mark_dirty(PS - 1, 2)  # straddles pages 0 and 1
    b.mark_dirty(5 * PS)
    assert b.dirty_count() == 3
    taken = b.sync_dirty_bitmap()
    assert list(iter_dirty(taken, PS)) == [0, PS, 5 * PS]
    assert b.dirty_count() == 0
    with pytest.raises(ConfigError):
        b.mark_dirty(16 * PS)


def test_page_runs_join_contiguous_pages() -> None:
    b = RAMBlock("ram", bytearray(16 * PS))
    runs = b.page_runs([0, PS, 2 * PS, 5 * PS, 7 * PS, 8 * PS])
    assert [len(r) for r in runs] == [3 * PS, PS, 2 * PS]


@pytest.mark.parametrize("fresh", [True, False])
def test_fill_page_zeroes_written_pages(fresh: bool) -> None:
    b = RAMBlock.allocate("ram", 8 * PS) if fresh else RAMBlock("ram", bytearray(8 * PS))
    b.note_written([PS])
    b.host[PS : 2 * PS] = b"\x07" * PS
    b.fill_page(PS)  # a page that held data, then a zero record: must become zero
    assert b.host[PS : 2 * PS].tobytes() == bytes(PS)
    b.fill_page(3 * PS, fill=0xAB)  # QEMU's fill byte
    assert b.host[3 * PS : 4 * PS].tobytes() == b"\xab" * PS
    b.fill_page(3 * PS)
    assert b.host[3 * PS : 4 * PS].tobytes() == bytes(PS)


def test_from_file_known_zero_only_when_new(tmp_path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"\x01" * (4 * PS))
    b = RAMBlock.from_file("img", path, 4 * PS)
    b.fill_page(0)  # an existing file's page is tested, not assumed zero
    assert b.host[:PS].tobytes() == bytes(PS)
    assert b.host[PS : 2 * PS].tobytes() == b"\x01" * PS
    b.close()


def test_bad_blocks() -> None:
    with pytest.raises(ConfigError):
        RAMBlock("ram", bytearray(PS + 1))
    with pytest.raises(ConfigError):
        RAMBlock("", bytearray(PS))
    with pytest.raises(ConfigError):
        RAMBlock("x" * 256, bytearray(PS))
    with pytest.raises(ConfigError):
        RAMBlock("ram", bytearray(PS), page_size=3000)


@pytest.mark.parametrize("backing", ["bytearray", "mmap"])
def test_zero_scanner_agrees_with_is_zero_page(backing: str) -> None:
    import random

    from multifd_core.image import vm_like_image
    from multifd_core.ram import ZeroScanner

    npages = 300
    image = vm_like_image(npages * PS, PS, seed=4)
    if backing == "mmap":
        b = RAMBlock.allocate("ram", npages * PS)
        b.host[:] = image
    else:
        b = RAMBlock("ram", image)
    rng = random.Random(1)
    for off in rng.sample(range(npages), 120):  # sparse and dense runs of dirty pages
        b.mark_dirty(off * PS)
    b.mark_dirty(100 * PS, 90 * PS)
    bitmap = b.sync_dirty_bitmap()
    scanner = ZeroScanner(b, bitmap, window=16)
    got = [scanner.is_zero(off) for off in iter_dirty(bitmap, PS)]
    want = [b.is_zero_page(off) for off in iter_dirty(bitmap, PS)]
    assert got == want and any(got) and not all(got)
