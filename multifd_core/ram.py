"""RAM blocks: named memory of fixed-size pages, with the dirty-page bitmap the app marks.

QEMU's RAMBlock, reduced to what migration needs. The backing memory is any writable buffer
(bytearray, mmap of a file, a numpy array, ...); the block keeps a memoryview of it and never
copies it. Its bookkeeping is one bit per page (bitmap.py's PageBitmap): the dirty bitmap a
source's app marks, and the written bitmap a destination keeps.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .bitmap import PageBitmap, iter_set
from .errors import ConfigError
from .wire import check_page_size, encode_block_name

ZERO_PAGE_CACHE: dict[int, bytes] = {}


def nonzero_rows(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """For each page (a row of 64-bit words): does it hold a non-zero byte? (an OR reduction)"""
    if not len(rows):
        return np.zeros(0, dtype=bool)
    nonzero: np.ndarray[Any, np.dtype[np.bool_]] = np.bitwise_or.reduce(rows, axis=1) != 0
    return nonzero


def zero_page(page_size: int) -> bytes:
    page = ZERO_PAGE_CACHE.get(page_size)
    if page is None:
        page = ZERO_PAGE_CACHE[page_size] = bytes(page_size)
    return page


class RAMBlock:
    """A named block of pages backed by a writable buffer.

    ``memory`` must be a C-contiguous buffer whose size is a multiple of ``page_size``; it must be
    writable for a destination (a source may send from read-only memory).

    The bookkeeping costs at most one bit per page beside the memory (32 MiB for 1 TiB of 4 KiB
    pages), and only the bits a block needs:

    - the dirty bitmap (``mark_dirty``, taken by ``sync_dirty_bitmap``) is made at the first
      mark: a destination never has one. A source holds one more while a round sends the one
      it took (a round takes every block's at its start; the pages marked meanwhile go to the
      next round);
    - ``written`` (a ``known_zero`` block only, kept by landing.py on a destination) tells which
      pages were written, so that a zero record for any other page costs nothing.

    Both are ``np.zeros`` (calloc): for a large block, fresh zero memory whose pages cost
    nothing until a bit in them is set.

    ``live`` (class attribute): the block's pages may change while a round sends them (a vCPU,
    another thread marking them dirty for the next round). With packet checksums the source
    then copies each packet's pages before hashing and sending that copy, so that a change
    cannot make the two disagree; a block that nothing writes during a round (a file being
    sent: :class:`~multifd_core.files.FileBlock`) is hashed and sent in place, and a change
    behind the source's back fails the migration with IntegrityError instead of a torn copy.
    """

    live: bool = True

    def __init__(
        self,
        name: str,
        memory: Any,
        page_size: int = 4096,
        *,
        known_zero: bool = False,
        fd: int | None = None,
    ) -> None:
        encode_block_name(name)
        check_page_size(page_size)
        mv = memoryview(memory)
        if not mv.c_contiguous:
            raise ConfigError(f"block {name!r}: memory is not contiguous")
        mv = mv.cast("B")
        if len(mv) == 0 or len(mv) % page_size:
            raise ConfigError(
                f"block {name!r}: size {len(mv)} is not a positive multiple of page size "
                f"{page_size}"
            )
        self.name = name
        self.memory = memory
        self.host = mv
        self.writable = not mv.readonly
        self.size = len(mv)
        self.page_size = page_size
        self.npages = self.size // page_size
        self._dirty: PageBitmap | None = None  # made at the first mark (see the docstring)
        self._dirty_lock = threading.Lock()  # marks from any thread, against the swap
        # known_zero: the memory is all zero now (fresh anonymous memory, a new file); then
        # ``written`` tracks which pages a destination wrote (landing.py keeps it), and zero
        # records for the others cost nothing (testing them would fault every page in)
        self.written: PageBitmap | None = PageBitmap(self.npages) if known_zero else None
        # bytearray/bytes compare in place; other buffers (mmap, arrays) through a page copy
        self._direct = memory if type(memory) in (bytearray, bytes) else None
        # fd: the file that ``memory`` maps (shared), owned by the block. A destination writes
        # received pages with pwrite through it (landing.py): a page fault per 4 KiB page of a
        # fresh shared mapping costs ~3x more than the kernel filling the page cache itself
        # (tmpfs, measured)
        self.fd = fd

    def __repr__(self) -> str:
        return f"RAMBlock({self.name!r}, size={self.size}, page_size={self.page_size})"

    @classmethod
    def allocate(cls, name: str, size: int, page_size: int = 4096) -> RAMBlock:
        """A zero-filled anonymous block (an anonymous mmap: pages cost nothing until touched)."""
        if size <= 0:
            raise ConfigError(f"block {name!r}: size {size} must be positive")
        return cls(name, mmap.mmap(-1, size), page_size, known_zero=True)

    @classmethod
    def from_file(
        cls,
        name: str,
        path: str | os.PathLike[str],
        size: int | None = None,
        page_size: int = 4096,
        *,
        create: bool = False,
        fd: int | None = None,
    ) -> RAMBlock:
        """A block backed by a shared mapping of a file (created/resized to ``size`` if given).

        ``fd``: the file, already open for reading and writing (``path`` then only names it in
        messages); the block owns it from here on, closed also when this fails. A destination
        writes such a block with pwrite only (landing.py), never through the mapping: a write
        to a shared mapping of a file whose blocks a full file system cannot give is a SIGBUS.
        """
        if fd is None:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            was_empty = os.fstat(fd).st_size == 0
            if size is not None:
                os.ftruncate(fd, size)
            length = os.fstat(fd).st_size
            if length == 0:
                raise ConfigError(f"block {name!r}: file {os.fspath(path)!r} is empty")
            mem = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls(name, mem, page_size, known_zero=was_empty, fd=fd)
        except BaseException:
            mem.close()
            os.close(fd)
            raise

    def close(self) -> None:
        """Release the memoryview and close an mmap backing (flushing a file mapping)."""
        self.host.release()
        if isinstance(self.memory, mmap.mmap):
            self.memory.close()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def content_fd(self) -> int | None:
        """A descriptor to read the block's content from with pread (its file), or None: read
        ``host``. Reading the file faults no page of a mapping in (integrity.block_digest)."""
        return self.fd

    # --- pages ----------------------------------------------------------------------------

    def page(self, offset: int) -> memoryview:
        return self.host[offset : offset + self.page_size]

    def is_zero_page(self, offset: int) -> bool:
        """True when the page holds only zero bytes (memcmp speed, no per-byte Python)."""
        ps = self.page_size
        if self._direct is not None:
            return bool(self._direct.startswith(zero_page(ps), offset))
        return self.host[offset : offset + ps].tobytes() == zero_page(ps)

    def data_extents(self, start: int, stop: int) -> list[tuple[int, int]] | None:
        """The page ranges of ``[start, stop)`` (page indexes) that may hold data, in order;
        every other page there is zero without reading it. None: any page may (memory)."""
        return None

    def page_words(self) -> np.ndarray[Any, np.dtype[np.uint64]]:
        """The memory as one row of 64-bit words per page (a view, no copy)."""
        return np.frombuffer(self.host, dtype=np.uint64).reshape(self.npages, self.page_size // 8)

    def spans(self, offsets: Sequence[int]) -> list[tuple[int, int]]:
        """The pages at ``offsets`` as (start, end) byte ranges, contiguous pages joined."""
        ps = self.page_size
        spans: list[tuple[int, int]] = []
        start = end = -1
        for off in offsets:
            if off == end:
                end += ps
                continue
            if start >= 0:
                spans.append((start, end))
            start, end = off, off + ps
        if start >= 0:
            spans.append((start, end))
        return spans

    def page_runs(self, offsets: Sequence[int]) -> list[memoryview]:
        """The pages at ``offsets`` as memoryviews, contiguous pages joined into one view."""
        host = self.host
        return [host[start:end] for start, end in self.spans(offsets)]

    def release(self, start: int, end: int) -> None:
        """The source has handed the pages of ``[start, end)`` to the channels: a block that can
        drop them from memory and read them again later (a file mapping) may do so."""

    # --- dirty tracking (the app marks, migration collects) --------------------------------

    def mark_dirty(self, offset: int, length: int = 1) -> None:
        """Mark every page touching ``[offset, offset + length)`` dirty, after changing them.

        Thread-safe: any thread (a vCPU-like writer) may mark while the migration takes the
        bitmap; a mark lands either in the round being taken or in the next one, never lost."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ConfigError(f"block {self.name!r}: range {offset}+{length} outside the block")
        first = offset // self.page_size
        last = (offset + length - 1) // self.page_size
        with self._dirty_lock:
            bitmap = self._dirty_bitmap()
            if first == last:
                bitmap.set(first)
            else:
                bitmap.set_range(first, last + 1)

    def mark_all_dirty(self) -> None:
        """Mark every page dirty (thread-safe, as ``mark_dirty``)."""
        with self._dirty_lock:
            self._dirty_bitmap().set_all()

    def _dirty_bitmap(self) -> PageBitmap:
        """The dirty bitmap, made at the first mark since the last sync (under the lock)."""
        bitmap = self._dirty
        if bitmap is None:
            bitmap = self._dirty = PageBitmap(self.npages)
        return bitmap

    def dirty_count(self) -> int:
        """Pages marked dirty since the last sync (a popcount of the bitmap)."""
        bitmap = self._dirty
        return 0 if bitmap is None else bitmap.count()

    def sync_dirty_bitmap(self) -> PageBitmap:
        """Take the dirty bitmap, one bit per page (QEMU's migration_bitmap_sync); the next
        mark starts a fresh one. Thread-safe against ``mark_dirty``."""
        with self._dirty_lock:
            taken, self._dirty = self._dirty, None
        return PageBitmap(self.npages) if taken is None else taken


def iter_dirty(bitmap: PageBitmap, page_size: int) -> Iterator[int]:
    """Yield the byte offsets of the pages set in ``bitmap``, in order (a window of the bitmap
    unpacked at a time)."""
    for page in iter_set(bitmap):
        yield page * page_size
