"""Every way received bytes reach a destination block, and the written-page bookkeeping.

Four ways in:

- a packet's pages scattered straight from the socket into the block's memory (nocomp), or
  decoded by the method into it;
- for a block with a file, a packet's pages gathered in the channel's bounce buffer and written
  with pwrite (on the event loop while the page cache takes them fast, in a worker thread once
  the file system throttles);
- zero records of the main stream, filling pages (``fill_page`` / ``fill_pages``), and the zero
  pages of a packet (QEMU 9's ``zero-page-detection=multifd``: ``zero_fill``, batched);
- whole pages carried in the main stream (``put_page``).

A block with a file is only ever written with pwrite, never through its shared mapping: a
full file system makes pwrite fail with ENOSPC (a :class:`StorageError` naming the file), a
store into the mapping a SIGBUS that kills the process. Reserving each file's blocks up front
with posix_fallocate instead would cost the whole block in the file system for a sparse guest
(256 MiB of tmpfs and ~50 ms for a 256 MiB block, measured), where a page's pwrite costs
~2.3 us against ~2.9 us for a store that faults the page into the mapping (tmpfs, measured).

The bookkeeping: a block made ``known_zero`` tracks which pages were written (``RAMBlock.written``)
so that a zero record for a page never written costs nothing (testing it would fault it in). The
rule, found by the fuzzer: **a page counts as written only after its bytes landed**. Noted before
an awaited receive, a zero record of the main channel landing meanwhile would clear the mark under
data still arriving, and later zero records for that page would be skipped (a stale page). Here
every path marks pages after their bytes are in place, in this module only.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import trio

from .errors import MethodError, ProtocolError, StorageError
from .integrity import PacketCheck
from .methods import MultiFDMethod, RecvContext
from .ram import RAMBlock, nonzero_rows, zero_page
from .transport import ChannelIO
from .wire import MultiFDPacket

#: Pages tested per step by ``fill_pages`` (a copy of this many pages at most).
FILL_CHUNK = 1024
#: INLINE_SLOW_WRITES writes in a row slower than INLINE_WRITE_LIMIT (seconds) move a channel's
#: later page writes off the event loop. Into the page cache, a packet's pwrite takes ~0.1-0.3 ms,
#: less than handing it to a worker thread and back (that hop cost ~30 % of a nocomp migration's
#: time, measured); a file system that throttles (dirty-page limits, a slow disk) takes far
#: longer. One slow write alone may be the process being descheduled, so it takes a few.
INLINE_WRITE_LIMIT = 0.005
INLINE_SLOW_WRITES = 3

Spans = Sequence[tuple[int, int]]


# --- the written-page bookkeeping and the main stream's records ----------------------------


def mark_written(block: RAMBlock, offsets: Sequence[int]) -> None:
    """The pages at ``offsets`` now hold the bytes that landed there (see the module's rule)."""
    written = block.written
    if written is not None and offsets:
        ps = block.page_size
        low, high = min(offsets), max(offsets)
        if high - low == (len(offsets) - 1) * ps:  # one run (a page, a packet's usual pages)
            # every page lies in [low, high]: marking the whole run marks them all (more only
            # with repeats, and a page marked written but zero only costs a zero write)
            written.set_range(low // ps, high // ps + 1)
        else:  # scattered pages, in C
            written.set_pages(np.fromiter(offsets, np.int64, len(offsets)) // ps)


def _pwrite(fd: int, view: memoryview | bytes, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _storage_error(fd: int, exc: OSError) -> StorageError:
    """A failed write to a block's file, naming the file (through /proc: the block knows only
    its descriptor)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = f"file descriptor {fd}"
    return StorageError(path, exc.errno or errno.EIO)


def write_page(block: RAMBlock, offset: int, data: bytes) -> None:
    """One page's bytes into the block: pwrite for a block with a file (never through its
    shared mapping: on a full file system that is a SIGBUS, pwrite an ENOSPC), else a copy."""
    _write_at(block, offset, data)


def _write_at(block: RAMBlock, offset: int, data: memoryview | bytes) -> None:
    """``data`` into the block at ``offset``: see ``write_page``; a failed pwrite is a
    StorageError naming the file."""
    fd = block.fd
    if fd is None:
        block.host[offset : offset + len(data)] = data
        return
    try:
        _pwrite(fd, data, offset)
    except OSError as exc:
        raise _storage_error(fd, exc) from None


def fill_page(block: RAMBlock, offset: int, fill: int = 0) -> None:
    """Make the page hold ``fill`` bytes (QEMU's ram_handle_compressed): a page already zero
    is left untouched, so fresh anonymous memory is not faulted in."""
    ps = block.page_size
    written = block.written
    if fill == 0:
        if written is not None:
            if written.test(offset // ps):
                write_page(block, offset, zero_page(ps))
                written.clear(offset // ps)
        elif not block.is_zero_page(offset):
            write_page(block, offset, zero_page(ps))
    else:
        write_page(block, offset, bytes((fill,)) * ps)
        mark_written(block, (offset,))


def fill_pages(block: RAMBlock, offsets: np.ndarray[Any, Any], fills: np.ndarray[Any, Any]) -> None:
    """``fill_page`` for many pages at once (``offsets`` valid page offsets of the block): the
    zero pages are tested and written in C, a chunk of pages at a time."""
    ps = block.page_size
    idx = (offsets // ps).astype(np.intp)
    other = fills != 0
    if other.any():  # QEMU only sends fill 0; any other fill goes page by page
        for off, fill in zip(offsets[other].tolist(), fills[other].tolist(), strict=True):
            fill_page(block, off, fill)
        idx = idx[~other]
    written = block.written
    if written is not None:
        dirty = idx[written.test_pages(idx)]  # only pages written before can be non-zero
        written.clear_pages(dirty)
        for off in (dirty * ps).tolist():
            write_page(block, off, zero_page(ps))
        return
    words = block.page_words()
    for i in range(0, len(idx), FILL_CHUNK):  # test a copy of at most FILL_CHUNK pages
        chunk = idx[i : i + FILL_CHUNK]
        nonzero = chunk[nonzero_rows(words[chunk])]
        if block.fd is None:
            words[nonzero] = 0
            continue
        for page in nonzero.tolist():  # a file's pages: pwrite (see write_page)
            write_page(block, page * ps, zero_page(ps))


def zero_fill(block: RAMBlock, offsets: Sequence[int]) -> None:
    """Zero the pages at ``offsets`` (valid page offsets of the block), as ``fill_pages`` does:
    QEMU's multifd_recv_zero_page_process, for the zero pages a packet lists."""
    fill_pages(
        block, np.fromiter(offsets, np.uint64, len(offsets)), np.zeros(len(offsets), np.uint8)
    )


def put_page(block: RAMBlock, offset: int, data: bytes) -> None:
    """A whole page carried in the main stream."""
    write_page(block, offset, data)
    mark_written(block, (offset,))


def write_spans(block: RAMBlock, spans: Spans, views: Sequence[memoryview]) -> None:
    """Write ``views`` (one per span, of its length) at ``spans``: pwrite when the block has a
    file, else a copy into the memory."""
    for (start, end), view in zip(spans, views, strict=True):
        _write_at(block, start, view[: end - start])


# --- a packet's pages, on one channel ------------------------------------------------------


class PacketLanding:
    """Where one receive channel lands its packets' pages: the block's memory, or this channel's
    bounce buffer then the block's file. Also decides whether file writes stay on the loop."""

    def __init__(
        self,
        io: ChannelIO,
        method: MultiFDMethod,
        ctx: RecvContext,
        limiter: trio.CapacityLimiter,
        max_bytes: int,
        payload_size: Callable[[int], tuple[int, int]] | None = None,
    ) -> None:
        self.io = io
        self.method = method
        self.ctx = ctx
        self.limiter = limiter
        self.max_bytes = max_bytes  # the largest packet's pages
        #: ``payload_size``: the method's, as the packet rules call it (recv.payload_bounds)
        bound = (payload_size or method.payload_size)(max_bytes)[1]
        self._payload = bytearray(0 if method.raw_payload else bound)
        self._bounce: bytearray | None = None  # pages bound for a file block (see _targets)
        self.inline_writes = True  # see write_file
        self._slow_writes = 0  # slow inline writes in a row

    async def land(
        self, block: RAMBlock, packet: MultiFDPacket, check: PacketCheck | None = None
    ) -> None:
        """Receive the packet's payload and put its pages in place, then mark them written;
        zero pages of the packet are filled after. ``check``: the packet's checksum, run on
        the pages as written (memory or what went to the file), where they were written."""
        if packet.normal_pages:
            spans = block.spans(packet.normal_offsets)
            what = f"packet {packet.packet_num} payload"
            if not self.method.raw_payload:
                await self._decode(block, packet, spans, what, check)
            elif block.fd is not None:  # the runs lie end to end in the bounce buffer
                runs = self._targets(block, spans)
                assert self._bounce is not None  # made by _targets
                size = packet.normal_pages * block.page_size
                await self.io.receive_into(memoryview(self._bounce)[:size], what)
                await self.write_file(block, spans, runs, check)
            else:
                runs = self._targets(block, spans)
                await self.io.receive_into_views(runs, what)
                if check is not None:  # on the loop: cheaper than a thread hop (integrity.py)
                    check(runs)
            mark_written(block, packet.normal_offsets)  # only now: the module's rule
        elif check is not None:
            check(())
        if packet.zero_pages:
            zero_fill(block, packet.zero_offsets)

    async def _decode(
        self,
        block: RAMBlock,
        packet: MultiFDPacket,
        spans: Spans,
        what: str,
        check: PacketCheck | None,
    ) -> None:
        runs = self._targets(block, spans)
        payload = memoryview(self._payload)[: packet.next_packet_size]
        await self.io.receive_into(payload, what)
        to_file = block.fd is not None

        def decode() -> None:  # one thread hop: decode, write, check
            try:
                self.ctx.recv_pages(payload, runs)
            except ProtocolError:  # DecompressionError: the peer's payload is bad (below)
                raise
            except Exception as exc:  # the plugin is broken: a MethodError, its cause kept
                raise MethodError.raised(
                    self.method.name,
                    "recv_pages",
                    exc,
                    channel=self.io.channel,
                    packet_num=packet.packet_num,
                ) from exc
            if to_file:
                write_spans(block, spans, runs)
            if check is not None:
                check(runs)

        try:
            await self._run(decode, self.method.threaded)
        except ProtocolError as exc:
            raise exc.located(channel=self.io.channel, packet_num=packet.packet_num) from None

    async def _run(self, fn: Callable[[], None], threaded: bool) -> None:
        if threaded:
            await trio.to_thread.run_sync(fn, limiter=self.limiter)
        else:
            fn()

    def _targets(self, block: RAMBlock, spans: Spans) -> list[memoryview]:
        """Where the packet's pages land first: the block's memory itself, or for a block with a
        file, this channel's bounce buffer (written to the file with pwrite afterwards)."""
        if block.fd is None:
            host = block.host
            return [host[start:end] for start, end in spans]
        if self._bounce is None:
            self._bounce = bytearray(self.max_bytes)
        bounce = memoryview(self._bounce)
        views = []
        pos = 0
        for start, end in spans:
            views.append(bounce[pos : pos + end - start])
            pos += end - start
        return views

    async def write_file(
        self,
        block: RAMBlock,
        spans: Spans,
        views: list[memoryview],
        check: PacketCheck | None = None,
    ) -> None:
        """Write a packet's pages (in ``views``) into the block's file: right here while the
        page cache takes them quickly, in a worker thread once INLINE_SLOW_WRITES writes in a row
        took longer than INLINE_WRITE_LIMIT (the file system throttles; the event loop must not
        wait on it). ``check`` runs on what was written, in the same place."""

        def write() -> None:
            write_spans(block, spans, views)
            if check is not None:
                check(views)

        if not self.inline_writes:
            await self._run(write, threaded=True)
            return
        t0 = time.perf_counter()
        write()
        if time.perf_counter() - t0 <= INLINE_WRITE_LIMIT:
            self._slow_writes = 0
        else:
            self._slow_writes += 1
            self.inline_writes = self._slow_writes < INLINE_SLOW_WRITES


__all__ = [
    "INLINE_SLOW_WRITES",
    "INLINE_WRITE_LIMIT",
    "PacketLanding",
    "fill_page",
    "fill_pages",
    "mark_written",
    "put_page",
    "write_page",
    "write_spans",
    "zero_fill",
]
