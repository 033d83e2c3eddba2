"""Finding the pages a round sends, a window at a time, in C (numpy) and off the event loop.

QEMU's ram_find_and_save_block walks the dirty bitmap page by page and tests each page with
buffer_is_zero. Here a whole window of pages is classified at once: the dirty pages of the window
(the window's bits of the one-bit-per-page bitmap unpacked, then ``flatnonzero``) split into
zero pages and normal pages by an OR reduction over each page's 64-bit words. A worker thread
classifies the next window while the event loop sends the current one (numpy releases the GIL
in its reductions).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import trio

from .bitmap import PageBitmap
from .ram import RAMBlock, nonzero_rows

#: Pages classified per window: 64 MiB of 4 KiB pages, 2 KiB of the bitmap (16 KiB unpacked). A
#: partly dirty window copies only its dirty pages (at most the window) to test them.
WINDOW = 16384
#: Windows classified ahead of the one being sent.
AHEAD = 1

Indexes = np.ndarray[Any, np.dtype[np.int64]]
#: One window's result: its first and end page, then the normal and the zero dirty pages in it.
Window = tuple[int, int, Indexes, Indexes]


def classify(
    words: np.ndarray[Any, np.dtype[np.uint64]],
    bitmap: PageBitmap,
    start: int,
    stop: int,
    extents: list[tuple[int, int]] | None = None,
) -> tuple[Indexes, Indexes]:
    """The dirty pages of ``[start, stop)`` as (normal page indexes, zero page indexes).

    ``extents`` (RAMBlock.data_extents): the page ranges that may hold data; the pages outside
    them are zero and are not read. None: every page is read."""
    dirty = bitmap.pages(start, stop)
    if not len(dirty):
        return dirty, dirty
    if extents is None:
        extents = [(start, stop)]  # any page may hold data
    if len(dirty) == stop - start:  # all dirty: views of the data, no copy
        nz = np.zeros(stop - start, dtype=bool)
        for a, b in extents:
            nz[a - start : b - start] = nonzero_rows(words[a:b])
    else:  # a copy of the dirty pages that may hold data, only
        maybe = np.zeros(stop - start, dtype=bool)
        for a, b in extents:
            maybe[a - start : b - start] = True
        read = maybe[dirty]
        nz = np.zeros(len(dirty), dtype=bool)
        nz[read] = nonzero_rows(words[dirty[read] + start])
    dirty += start
    return dirty[nz], dirty[~nz]


def classify_block(
    block: RAMBlock,
    words: np.ndarray[Any, np.dtype[np.uint64]],
    bitmap: PageBitmap,
    start: int,
    stop: int,
    detect_zero: bool = True,
) -> tuple[Indexes, Indexes]:
    """``classify`` a window of ``block``, skipping the pages its file has no data for.
    ``detect_zero`` False: no page is read, every dirty page is normal (QEMU's
    zero-page-detection=none)."""
    if not detect_zero:
        dirty = bitmap.pages(start, stop) + start
        return dirty, dirty[:0]
    return classify(words, bitmap, start, stop, block.data_extents(start, stop))


async def produce_windows(
    block: RAMBlock,
    bitmap: PageBitmap,
    send: trio.MemorySendChannel[Window],
    window: int = WINDOW,
    *,
    detect_zero: bool = True,
) -> None:
    """Send (start, stop, normal, zero) for ``block``'s dirty pages on ``send``, window by window,
    in order, then close it. Run it as a task beside the consumer: with a channel buffer of
    ``AHEAD``, it classifies the next window in a worker thread while the consumer sends the
    current one. ``bitmap`` must not change meanwhile (the round's, from ``sync_dirty_bitmap``).
    ``detect_zero`` False: no page is tested, all are normal.
    """
    words = block.page_words()
    async with send:
        for start in range(0, block.npages, window):
            stop = min(start + window, block.npages)
            if not bitmap.any(start, stop):
                continue  # nothing dirty here: not worth a thread
            normal, zero = await trio.to_thread.run_sync(
                classify_block, block, words, bitmap, start, stop, detect_zero
            )
            try:
                await send.send((start, stop, normal, zero))
            except trio.BrokenResourceError:
                return  # the consumer is gone (its round failed or was cancelled): its error
                # is the one that tells; this would only hide it in a traceback


__all__ = [
    "AHEAD",
    "WINDOW",
    "Window",
    "classify",
    "classify_block",
    "produce_windows",
]
