"""Every page and data generator the tests use, in one place.

Pages for a method's contexts (:func:`sample_pages`, :func:`mixed_pages`, :data:`TEXT`), views of
a buffer split the way the engine sends it (:func:`page_views`, :func:`random_runs`), one packet's
payload through a context and back (:func:`prepare_payload`, :func:`receive_payload`), buffers
whose edges must stay untouched (:class:`Guarded`, :func:`guarded_block`) and RAM blocks holding
a VM-like image (:func:`image_blocks`, :func:`dirty_blocks`), and input files for the file
commands (:func:`random_files`). All of them are deterministic: the
same arguments give the same bytes, so golden payloads stay valid.
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..image import dirty_some_pages, make_page, vm_like_image
from ..methods import RecvContext, SendContext
from ..ram import RAMBlock

PAGE = 4096
KINDS = ("zero", "random", "text", "repeated", "single")

#: Some 11 KB of compressible text: the source of the text pages of :func:`mixed_pages`.
TEXT = b"".join(b"line %5d: the quick brown fox jumps over the lazy dog\n" % i for i in range(200))


def sample_pages(count: int, seed: int, page_size: int = PAGE) -> list[bytes]:
    """``count`` distinct pages of every kind."""
    rng = random.Random(seed)
    return [
        make_page(seed * 100_000 + i, page_size, KINDS[i % len(KINDS)], rng) for i in range(count)
    ]


def tagged_page(rng: random.Random, tag: int, page_size: int = PAGE) -> bytes:
    """A random page whose first 8 bytes are ``tag`` (little-endian): unique and recognisable."""
    return tag.to_bytes(8, "little") + rng.randbytes(page_size - 8)


def _mixed_page(kind: int, rng: random.Random, pages: list[bytes]) -> bytes:
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return rng.randbytes(PAGE)
    if kind == 2:
        at = rng.randrange(len(TEXT) - PAGE)
        return TEXT[at : at + PAGE]
    if kind == 3 and pages:
        return rng.choice(pages)
    if kind == 4:
        return rng.randbytes(PAGE // 2) + bytes(PAGE // 2)
    return bytes([rng.randrange(256)]) * 64 + rng.randbytes(64) * 63


def mixed_pages(n: int, seed: int) -> list[bytes]:
    """``n`` pages of a VM-like mix: zero, random, text, repeated and half-filled pages.

    The same ``(n, seed)`` always gives the same pages, so golden payloads stay valid.
    """
    rng = random.Random(seed)
    pages: list[bytes] = []
    for _ in range(n):
        pages.append(_mixed_page(rng.randrange(6), rng, pages))
    return pages


def join(parts: Iterable[Any]) -> bytes:
    """The bytes of a sequence of buffers (what ``send_prepare`` returns), joined."""
    return b"".join(bytes(p) for p in parts)


def page_views(buf: bytearray, runs: Sequence[int]) -> list[memoryview]:
    """Views of ``buf`` split into runs of the given page counts (the engine sends runs).

    The runs must cover ``buf`` exactly.
    """
    mv = memoryview(buf)
    out, at = [], 0
    for count in runs:
        out.append(mv[at : at + count * PAGE])
        at += count * PAGE
    if at != len(buf):
        raise ValueError(f"runs of {sum(runs)} pages do not cover a buffer of {len(buf)} bytes")
    return out


def random_runs(npages: int, rng: random.Random) -> list[int]:
    """Split ``npages`` into runs of 1 to 8 pages, drawn from ``rng``."""
    runs = []
    while npages:
        n = rng.randint(1, min(npages, 8))
        runs.append(n)
        npages -= n
    return runs


def prepare(ctx: SendContext, pages: Sequence[bytes]) -> bytes:
    """One packet's payload for ``pages`` through a send context."""
    return join(ctx.send_prepare([memoryview(p) for p in pages]))


def prepare_payload(
    send_ctx: SendContext, pages: Sequence[bytes], runs: Sequence[int] | None = None
) -> bytes:
    """One packet's payload for ``pages``, given as views of runs of ``runs`` pages (default:
    one view a page)."""
    src = bytearray(b"".join(pages))
    return join(send_ctx.send_prepare(page_views(src, runs or [1] * len(pages))))


def receive_payload(
    recv_ctx: RecvContext, payload: bytes, npages: int, runs: Sequence[int] | None = None
) -> bytes:
    """Decode ``payload`` into ``npages`` fresh pages, given as views of runs of ``runs`` pages
    (default: one view a page); return their bytes."""
    dst = bytearray(npages * PAGE)
    recv_ctx.recv_pages(memoryview(payload), page_views(dst, runs or [1] * npages))
    return bytes(dst)


class Guarded:
    """``npages`` destination pages inside a buffer whose edges must never be written."""

    GUARD = 64 * 1024
    FILL = b"\xa5"

    def __init__(self, npages: int, page_size: int = PAGE, guard: int = GUARD) -> None:
        self.size = npages * page_size
        self.page_size = page_size
        self.guard = guard
        self.buf = bytearray(self.FILL * (self.size + 2 * guard))
        self.view = memoryview(self.buf)[guard : guard + self.size]
        self.pages = [self.view[i * page_size : (i + 1) * page_size] for i in range(npages)]

    def contents(self) -> bytes:
        """The bytes between the guards."""
        return bytes(self.view)

    def guards_intact(self) -> bool:
        """Whether nothing was written outside the pages."""
        return self.outside_writes() is None

    def outside_writes(self) -> str | None:
        """Where the first byte written outside the pages is, if any (None: nothing was)."""
        g = self.guard
        before, after = bytes(self.buf[:g]), bytes(self.buf[g + self.size :])
        written = len(before.rstrip(self.FILL))  # one past the written byte nearest the pages
        if written:
            return f"offset {written - 1 - g} (before the first page)"
        untouched = len(after) - len(after.lstrip(self.FILL))
        if untouched < g:
            return f"offset {self.size + untouched} (past the last page's end, {self.size})"
        return None


def guarded_block(name: str, size: int, page_size: int = PAGE) -> tuple[RAMBlock, Guarded]:
    """A RAM block that is the middle of a larger buffer whose edges must stay untouched."""
    guarded = Guarded(size // page_size, page_size)
    return RAMBlock(name, guarded.view, page_size), guarded


def image_blocks(
    sizes: Mapping[str, int] | int = 4 << 20, page_size: int = PAGE, seed: int = 1
) -> list[RAMBlock]:
    """RAM blocks holding VM-like images: ``{name: size}``, or one ``pc.ram`` of ``sizes``
    bytes. Block ``i`` is drawn from seed ``seed + i``."""
    if isinstance(sizes, int):
        sizes = {"pc.ram": sizes}
    return [
        RAMBlock(name, vm_like_image(size, page_size, seed + i), page_size)
        for i, (name, size) in enumerate(sizes.items())
    ]


def dirty_blocks(
    blocks: Iterable[RAMBlock], count: int, rng: random.Random, generation: int
) -> None:
    """Rewrite ``count`` random pages of every block (as a running guest) and mark them dirty."""
    for block in blocks:
        for off in dirty_some_pages(block.memory, block.page_size, count, rng, generation):
            block.mark_dirty(off)


def random_files(
    directory: str | os.PathLike[str],
    sizes: Mapping[str, int],
    seed: int,
    zero: Collection[str] = (),
) -> list[Path]:
    """Create ``directory`` holding a file of each of ``sizes`` (name: bytes), random bytes
    drawn in order from ``random.Random(seed)``, but zero bytes for the names in ``zero``."""
    where = Path(directory)
    where.mkdir()
    rng = random.Random(seed)
    files = []
    for name, size in sizes.items():
        path = where / name
        path.write_bytes(bytes(size) if name in zero else rng.randbytes(size))
        files.append(path)
    return files
