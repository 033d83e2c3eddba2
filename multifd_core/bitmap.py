"""One bit per page: the dirty and written bitmaps of a RAMBlock, in C (numpy).

Page ``p`` is bit ``p % 8`` of byte ``p // 8``, least significant bit first: numpy's
``bitorder="little"`` (``np.packbits`` / ``np.unpackbits`` with that order read and write this
layout; QEMU's unsigned-long bitmaps on a little-endian host hold the same bytes). A 1 TiB block
of 4 KiB pages (268,435,456 pages) costs 32 MiB, where a byte per page cost 256 MiB; the bits
are ``np.zeros`` (calloc): for a large map, fresh zero memory whose pages cost nothing until a
bit in them is set.

Every operation is C work bounded by the pages it is given: a range sets its edge bits and fills
the whole bytes between; a window's pages are found by unpacking that window only; counting is
a popcount (``np.bitwise_count``) over chunks of :data:`CHUNK` pages, and whole-map walks
(:meth:`PageBitmap.count`, :func:`iter_set`) go chunk by chunk, so no operation ever unpacks a
whole block.

A PageBitmap is not thread-safe by itself: RAMBlock serialises the marks of its dirty bitmap and
its swap with a lock; the written bitmap is only ever changed on the event loop's thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

#: Pages per step of a whole-map walk (count, iteration): 128 KiB of bits, 1 MiB unpacked.
CHUNK = 1 << 20

#: Ranges of at most this many whole bytes are filled from _FULL, longer ones by numpy.
_FULL_BYTES_SMALL = 256
_FULL = b"\xff" * _FULL_BYTES_SMALL

Indexes = np.ndarray[Any, np.dtype[np.int64]]
Pages = Sequence[int] | np.ndarray[Any, Any]


def _as_pages(pages: Pages) -> Indexes:
    if isinstance(pages, np.ndarray):
        return pages.astype(np.int64, copy=False)
    return np.fromiter(pages, np.int64, len(pages))


def _masks(pages: Indexes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    masks: np.ndarray[Any, np.dtype[np.uint8]] = np.left_shift(1, pages & 7).astype(np.uint8)
    return masks


class PageBitmap:
    """One bit per page of ``npages`` pages, all clear at first (see the module)."""

    __slots__ = ("_view", "bits", "npages")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.bits: np.ndarray[Any, np.dtype[np.uint8]] = np.zeros((npages + 7) >> 3, np.uint8)
        self._view = self.bits.data  # a memoryview: single bytes far cheaper than numpy scalars

    def __repr__(self) -> str:
        return f"PageBitmap({self.npages} pages, {self.count()} set)"

    def __len__(self) -> int:
        return self.npages

    @property
    def nbytes(self) -> int:
        """The memory the bits take (``ceil(npages / 8)`` bytes)."""
        return self.bits.nbytes

    # --- single pages and ranges ------------------------------------------------------------

    def test(self, page: int) -> bool:
        return bool(self._view[page >> 3] >> (page & 7) & 1)

    def set(self, page: int) -> None:
        self._view[page >> 3] |= 1 << (page & 7)

    def clear(self, page: int) -> None:
        self._view[page >> 3] &= ~(1 << (page & 7)) & 0xFF

    def set_range(self, first: int, stop: int) -> None:
        """Set pages ``[first, stop)``: the edge bytes' bits, then the whole bytes between."""
        if first >= stop:
            return
        view = self._view
        a, b = first >> 3, stop >> 3
        lo, hi = first & 7, stop & 7
        if a == b:  # within one byte
            view[a] |= ((1 << hi) - 1) & ~((1 << lo) - 1) & 0xFF
            return
        if lo:
            view[a] |= (0xFF << lo) & 0xFF
            a += 1
        if b - a > _FULL_BYTES_SMALL:
            self.bits[a:b] = 0xFF
        elif b > a:  # a few bytes: cheaper through the memoryview than a numpy slice
            view[a:b] = _FULL[: b - a]
        if hi:
            view[b] |= (1 << hi) - 1

    def set_all(self) -> None:
        self.set_range(0, self.npages)

    # --- many pages at once (page indexes, any order, repeats allowed) ----------------------

    def set_pages(self, pages: Pages) -> None:
        idx = _as_pages(pages)
        np.bitwise_or.at(self.bits, idx >> 3, _masks(idx))

    def clear_pages(self, pages: Pages) -> None:
        idx = _as_pages(pages)
        np.bitwise_and.at(self.bits, idx >> 3, ~_masks(idx))

    def test_pages(self, pages: Pages) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """For each page of ``pages``: is its bit set?"""
        idx = _as_pages(pages)
        got: np.ndarray[Any, np.dtype[np.bool_]] = (self.bits[idx >> 3] >> (idx & 7)) & 1 != 0
        return got

    # --- windows ------------------------------------------------------------------------------

    def window(self, start: int, stop: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The bits of pages ``[start, stop)`` unpacked, one uint8 (0 or 1) per page: only the
        bytes covering the window are unpacked (the caller bounds the window)."""
        a = start >> 3
        unpacked = np.unpackbits(self.bits[a : (stop + 7) >> 3], bitorder="little")
        got: np.ndarray[Any, np.dtype[np.uint8]] = unpacked[start - 8 * a : stop - 8 * a]
        return got

    def pages(self, start: int, stop: int) -> Indexes:
        """The pages of ``[start, stop)`` whose bit is set, in order, relative to ``start``."""
        got: Indexes = np.flatnonzero(self.window(start, stop))
        return got

    def any(self, start: int = 0, stop: int | None = None) -> bool:
        """Whether a page of ``[start, stop)`` is set (the whole bytes first: no unpacking
        when they are all clear)."""
        stop = self.npages if stop is None else stop
        if start >= stop or not self.bits[start >> 3 : (stop + 7) >> 3].any():
            return False
        return bool(self.window(start, stop).any())

    def count(self, start: int = 0, stop: int | None = None) -> int:
        """How many pages of ``[start, stop)`` are set (a popcount, CHUNK pages at a time)."""
        stop = self.npages if stop is None else stop
        total = 0
        for lo in range(start, stop, CHUNK):
            hi = min(lo + CHUNK, stop)
            if lo & 7 or (hi & 7 and hi != self.npages):  # unaligned edges: unpack them
                total += int(np.count_nonzero(self.window(lo, hi)))
            else:  # whole bytes (the bits past npages are never set)
                total += int(np.bitwise_count(self.bits[lo >> 3 : (hi + 7) >> 3]).sum())
        return total


def iter_set(bitmap: PageBitmap) -> Iterator[int]:
    """The set pages' indexes, in order, a CHUNK of pages unpacked at a time."""
    for start in range(0, bitmap.npages, CHUNK):
        stop = min(start + CHUNK, bitmap.npages)
        if bitmap.any(start, stop):
            yield from (bitmap.pages(start, stop) + start).tolist()


__all__ = ["CHUNK", "PageBitmap", "iter_set"]
