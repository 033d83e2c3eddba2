"""VM-like memory images for demos, tests and benchmarks.

A guest's RAM is mostly zero pages, then code and data that compress a little, text that compresses
well, repeated patterns, and pages with a single non-zero byte. Every non-zero page here is unique
(it carries its page index), so a page landing at the wrong offset is always detected.
"""

from __future__ import annotations

import random
import struct

_TEXT = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua. migration multifd channel packet sync "
    b"ramblock offset page round dirty bitmap zero page. "
)
_TEXT_LONG = _TEXT * (2 * 1024 * 1024 // len(_TEXT) + 2)

#: Kinds of page, in the proportions of a booted guest (about a third zero pages).
KINDS = ("zero", "zero", "zero", "random", "random", "text", "text", "repeated", "single")


def page_kind(index: int, seed: int = 0) -> str:
    return KINDS[(index * 7 + seed * 13 + (index >> 5)) % len(KINDS)]


def make_page(index: int, page_size: int, kind: str, rng: random.Random) -> bytes:
    """One page of ``kind``; non-zero kinds embed ``index`` so that every page is unique."""
    tag = struct.pack("<Q", index + 1)
    if kind == "zero":
        return bytes(page_size)
    if kind == "random":
        return tag + rng.randbytes(page_size - 8)
    if kind == "text":
        shift = index % 97
        return tag + _TEXT_LONG[shift : shift + page_size - 8]
    if kind == "repeated":
        return (tag * (page_size // 8))[:page_size]
    if kind == "single":
        pos = (index * 31) % page_size
        page = bytearray(page_size)
        page[pos] = (index % 255) + 1
        return bytes(page)
    raise ValueError(f"unknown page kind {kind!r}")


def fill_vm_like(buf: bytearray | memoryview, page_size: int = 4096, seed: int = 0) -> None:
    """Fill ``buf`` (a multiple of ``page_size``) with a VM-like mix of pages."""
    view = memoryview(buf).cast("B")
    rng = random.Random(seed)
    for i in range(len(view) // page_size):
        kind = page_kind(i, seed)
        if kind != "zero":
            view[i * page_size : (i + 1) * page_size] = make_page(i, page_size, kind, rng)


def vm_like_image(size: int, page_size: int = 4096, seed: int = 0) -> bytearray:
    """A new ``size``-byte VM-like image."""
    buf = bytearray(size)
    fill_vm_like(buf, page_size, seed)
    return buf


def dirty_some_pages(
    buf: bytearray | memoryview, page_size: int, count: int, rng: random.Random, generation: int
) -> list[int]:
    """Rewrite ``count`` random pages (some to zero, some to new unique data); returns their
    offsets, for the caller to mark dirty."""
    view = memoryview(buf).cast("B")
    npages = len(view) // page_size
    offsets = []
    for _ in range(count):
        i = rng.randrange(npages)
        kind = rng.choice(KINDS)
        page = make_page(i + generation * npages, page_size, kind, rng)
        view[i * page_size : (i + 1) * page_size] = page
        offsets.append(i * page_size)
    return offsets
