"""RAM blocks: dirty tracking, zero pages, runs, file-backed blocks."""

from __future__ import annotations

import pytest

from multifd_core import RAMBlock
from multifd_core.bitmap import PageBitmap
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


def test_bad_blocks() -> None:
    with pytest.raises(ConfigError):
        RAMBlock("ram", bytearray(PS + 1))
    with pytest.raises(ConfigError):
        RAMBlock("", bytearray(PS))
    with pytest.raises(ConfigError):
        RAMBlock("x" * 256, bytearray(PS))
    with pytest.raises(ConfigError):
        RAMBlock("ram", bytearray(PS), page_size=3000)


def _dirty_image_block(backing: str, npages: int = 300) -> tuple[RAMBlock, PageBitmap]:
    import random

    from multifd_core.image import vm_like_image

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
    return b, b.sync_dirty_bitmap()


@pytest.mark.parametrize("backing", ["bytearray", "mmap"])
@pytest.mark.parametrize("window", [16, 64, 1000])
def test_classify_agrees_with_is_zero_page(backing: str, window: int) -> None:
    from multifd_core.scan import classify

    b, bitmap = _dirty_image_block(backing)
    words = b.page_words()
    normal: list[int] = []
    zero: list[int] = []
    for start in range(0, b.npages, window):  # partly dirty and fully dirty windows
        n, z = classify(words, bitmap, start, min(start + window, b.npages))
        normal += (n * PS).tolist()
        zero += (z * PS).tolist()
    dirty = list(iter_dirty(bitmap, PS))
    assert normal == [off for off in dirty if not b.is_zero_page(off)]
    assert zero == [off for off in dirty if b.is_zero_page(off)]
    assert normal and zero


async def test_produce_windows_in_order() -> None:
    import trio

    from multifd_core.scan import produce_windows

    b, bitmap = _dirty_image_block("bytearray")
    send, recv = trio.open_memory_channel(1)
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce_windows, b, bitmap, send, 7)
        async for _start, _stop, normal, zero in recv:
            got += sorted(normal.tolist() + zero.tolist())
    assert got == [off // PS for off in iter_dirty(bitmap, PS)]


async def test_produce_windows_ends_quietly_when_its_consumer_is_gone() -> None:
    """The consumer closed its end (its round failed or was cancelled) while a window was
    being classified: the producer ends without an error of its own (a BrokenResourceError
    would surface beside, or instead of, the error that tells what happened)."""
    import trio

    from multifd_core.scan import produce_windows

    b, bitmap = _dirty_image_block("bytearray")
    send, recv = trio.open_memory_channel(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce_windows, b, bitmap, send, 7)
        await recv.receive()  # one window, then the consumer goes away
        await recv.aclose()
    with pytest.raises(trio.ClosedResourceError):
        send.send_nowait((0, 0, None, None))  # the producer closed its end on the way out


def _rss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:"))


def test_file_block_release_drops_pages_and_keeps_data(tmp_path) -> None:
    import hashlib
    import os as _os

    from multifd_core.files import FileBlock

    path = tmp_path / "f.img"
    data = _os.urandom(32 << 20)
    path.write_bytes(data)
    b = FileBlock("f.img", path)
    try:
        assert hashlib.sha256(b.host).digest() == hashlib.sha256(data).digest()  # all resident
        before = _rss_kib()
        b.release(4 << 20, 28 << 20)
        dropped = before - _rss_kib()
        assert dropped >= 0.9 * (24 << 10), f"only {dropped} KiB left the process"
        # the pages read back from the page cache, unchanged
        assert b.host.tobytes() == data
    finally:
        b.close()


def _sparse_file(path, npages: int, data_pages: list[int], seed: int = 3):
    """A file of ``npages`` pages, holes except ``data_pages`` (each non-zero but for one zero
    page written explicitly, which is data yet zero)."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(npages * PS)
        for i, page in enumerate(data_pages):
            f.seek(page * PS)
            f.write(bytes(PS) if i == 1 else rng.randbytes(PS))
    return path


@pytest.mark.parametrize("where", ["tmp", "shm"])
@pytest.mark.parametrize("partly_dirty", [False, True])
def test_file_holes_are_zero_pages_never_read(tmp_path, where: str, partly_dirty: bool) -> None:
    """A sparse source file: its holes classify as zero pages from SEEK_DATA alone, the data
    pages as read; on tmpfs, where reading a hole through a mapping allocates it, the file
    keeps its size on disk (st_blocks)."""
    import os as _os
    from pathlib import Path

    from multifd_core.files import FileBlock
    from multifd_core.scan import classify_block

    base = tmp_path if where == "tmp" else Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no /dev/shm (tmpfs)")
    npages = 4096
    data_pages = [3, 4, 5, 700, 701, 2048, 4095]
    path = _sparse_file(base / f"sparse-{_os.getpid()}.img", npages, data_pages)
    try:
        blocks_before = _os.stat(path).st_blocks
        b = FileBlock("f", path)
        try:
            extents = b.data_extents(0, npages)
            if extents is None:
                pytest.skip("this file system cannot list data extents")
            covered = {p for a, z in extents for p in range(a, z)}
            assert set(data_pages) <= covered and len(covered) < 64  # holes are not data
            bitmap = PageBitmap(npages)
            if partly_dirty:
                bitmap.set_pages([0, 3, 4, 701, 1000, 2048, 4095])
            else:
                bitmap.set_all()
            normal: list[int] = []
            zero: list[int] = []
            for start in range(0, npages, 1000):  # windows cut inside extents and holes
                n, z = classify_block(b, b.page_words(), bitmap, start, min(start + 1000, npages))
                normal += n.tolist()
                zero += z.tolist()
            dirty = [p for p in range(npages) if bitmap.test(p)]
            want_normal = [p for p in dirty if p in data_pages and p != data_pages[1]]
            assert normal == want_normal
            assert zero == [p for p in dirty if p not in want_normal]
        finally:
            b.close()
        assert _os.stat(path).st_blocks == blocks_before
    finally:
        path.unlink()


def test_finely_fragmented_file_is_read_instead(tmp_path, monkeypatch) -> None:
    """Past MAX_EXTENTS extents in a window, data_extents gives up (None) and every page is
    read; the classification stays right."""
    from multifd_core import files
    from multifd_core.scan import classify_block

    monkeypatch.setattr(files, "MAX_EXTENTS", 4)
    data_pages = list(range(0, 40, 2))  # 20 one-page extents
    path = _sparse_file(tmp_path / "frag.img", 64, data_pages)
    b = files.FileBlock("f", path)
    try:
        if b.data_extents(0, 4) is None:
            pytest.skip("this file system cannot list data extents")
        assert b.data_extents(0, 64) is None
        every = PageBitmap(64)
        every.set_all()
        n, z = classify_block(b, b.page_words(), every, 0, 64)
        assert n.tolist() == [p for p in data_pages if p != data_pages[1]]
        assert len(n) + len(z) == 64
    finally:
        b.close()
