"""Migration statistics, shaped like QEMU's query-migrate. A leaf module.

Every counter changes through one method of these classes (``packet``, ``add_zero_pages``,
``round_done``, ...), called by the engine at the one place each event happens; no other module
assigns a field. Both ends count the same things the same way: a *round* is one pass over the
dirty pages that ends in a sync barrier (``send_round()`` / ``complete()`` on the source, the
matching end-of-round in the main stream on the destination); the sync of the setup, before any
page, is not a round.

:class:`Progress` is a frozen snapshot of those counters for a program's progress display
(``Source.progress()`` / ``Destination.progress()``): the round's plan and the pages done in
it, counted per packet, and the totals across rounds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

#: How a migration end stands: set up, sending/receiving, or how it ended.
MigrationStatus = Literal["setup", "active", "completed", "failed", "cancelled"]


@dataclass
class ChannelStats:
    """Per multifd channel (QEMU: MultiFDSendParams/RecvParams num_packets etc.)."""

    id: int
    packets: int = 0
    normal_pages: int = 0
    sync_packets: int = 0
    wire_bytes: int = 0

    def packet(self, normal_pages: int, wire_bytes: int, sync: bool) -> None:
        """One packet sent or received on this channel."""
        self.packets += 1
        self.normal_pages += normal_pages
        self.wire_bytes += wire_bytes
        if sync:
            self.sync_packets += 1


@dataclass(frozen=True, slots=True)
class Progress:
    """Where one end of a migration is, at one moment: ``Source.progress()`` or
    ``Destination.progress()``. Cheap to take (no I/O, no lock, no allocation beyond itself):
    poll it from any task of the migration's trio run, as often as a display redraws.

    Pages count as they go: a packet's pages once its channel has written it (source) or its
    pages have landed (destination), zero pages sent as main-stream records as those records are
    written (a 64 MiB window's zero pages at once), pages carried in the main stream as they land.

    ``fraction``, in ``[0.0, 1.0]``, never decreasing within a round, 1.0 once completed:

    - source: ``round_pages_done / round_pages`` of the round in progress. Its plan is exact:
      a round syncs every block's dirty bitmap when it starts, and sends those pages, no more,
      no fewer (pages dirtied meanwhile go in the next round). Before the first round it is
      0.0; between rounds it stays at the last round's 1.0 (``round`` is the last one).
    - destination: the destination never learns the source's plan (the stream announces no
      round's size, and QEMU's rounds are many sections), so ``round_pages`` is None and
      ``fraction`` is ``pages / total_pages`` capped at 1.0: how much of the RAM announced has
      arrived, exact for a one-round migration (the first round sends every page, as QEMU's and
      this library's sources do), and 1.0 from the end of the first round of a longer one.
    """

    role: str  #: "source" or "destination"
    status: str  #: as ``MigrationStats.status``
    #: the round in progress, 1 for the first; between rounds and at the end, the last one;
    #: 0 before the first (the destination learns that a round started from its first page)
    round: int
    #: pages ``round`` sends (source); None on the destination (not known there)
    round_pages: int | None
    #: pages of ``round`` sent (source) / received (destination) so far
    round_pages_done: int
    fraction: float
    rounds_done: int  #: rounds ended with their sync (QEMU: dirty-sync-count)
    pages: int  #: pages sent / received so far, every round (normal, zero and inline)
    total_pages: int  #: pages of all blocks (destination: 0 until the source announced them)
    page_size: int
    wire_bytes: int  #: bytes on the main and multifd channels so far
    seconds: float  #: since the migration started
    throughput: float  #: bytes of (non-zero) page data per second, as ``MigrationStats``

    @property
    def round_bytes(self) -> int | None:
        """Bytes of the pages the round sends (None on the destination)."""
        return None if self.round_pages is None else self.round_pages * self.page_size

    @property
    def round_bytes_done(self) -> int:
        return self.round_pages_done * self.page_size

    @property
    def bytes(self) -> int:
        """Bytes of the pages sent / received so far, every round."""
        return self.pages * self.page_size

    @property
    def total_bytes(self) -> int:
        return self.total_pages * self.page_size


def _share(done: int, planned: int) -> float:
    """``done / planned`` capped at 1.0; nothing planned is all done."""
    return min(1.0, done / planned) if planned > 0 else 1.0


@dataclass
class MigrationStats:
    """Live counters of one migration end; ``as_dict()`` gives the JSON the CLI prints."""

    role: str
    channels: int
    method: str
    page_size: int
    status: MigrationStatus = "setup"
    total_bytes: int = 0  # size of all blocks
    normal_pages: int = 0  # pages sent / received on multifd channels
    zero_pages: int = 0  # zero pages sent / received, as records or in packets
    zero_record_pages: int = 0  # of those, the ones sent as main-stream zero records
    inline_pages: int = 0  # pages carried in the main stream
    packets: int = 0
    rounds: int = 0  # completed sync rounds (QEMU: dirty-sync-count)
    main_bytes: int = 0
    multifd_bytes: int = 0  # header + payload bytes on multifd channels
    payload_bytes: int = 0  # payload bytes on multifd channels
    checksum_packets: int = 0  # packets sealed with a checksum (source) / checked (destination)
    verified_blocks: int = 0  # blocks whose content digest was sent (source) / checked
    refused_connections: int = 0  # destination: connections closed as not this migration's
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    #: CPU seconds of the whole process and of the thread running this end's event loop (the
    #: one that made the stats), from here to ``finish`` (cpu_seconds): where the engine's own
    #: Python runs, against what its worker threads and the kernel do for it
    cpu_started: tuple[float, float, int] = field(
        default_factory=lambda: (time.process_time(), time.thread_time(), threading.get_ident())
    )
    cpu_seconds: tuple[float, float | None] | None = None
    error: str | None = None
    per_channel: list[ChannelStats] = field(default_factory=list)
    #: source: pages the round in progress (or the last one) sends, from its dirty bitmaps
    round_planned_pages: int = 0
    #: pages of the round in progress (or the last one) done: sent / received, packet by packet
    round_done_pages: int = 0
    #: between a round's start (source: ``round_start``; destination: its first page) and end
    in_round: bool = False

    @property
    def seconds(self) -> float:
        end = self.ended if self.ended is not None else time.monotonic()
        return end - self.started

    @property
    def normal_bytes(self) -> int:
        return self.normal_pages * self.page_size

    @property
    def wire_bytes(self) -> int:
        return self.main_bytes + self.multifd_bytes

    @property
    def throughput(self) -> float:
        """Bytes of page data (non-zero pages) per second."""
        s = self.seconds
        return self.normal_bytes / s if s > 0 else 0.0

    @property
    def compression_ratio(self) -> float:
        """Page bytes per payload byte on the multifd channels (1.0 without compression)."""
        return self.normal_bytes / self.payload_bytes if self.payload_bytes else 1.0

    def progress(self) -> Progress:
        """A :class:`Progress` snapshot of these counters."""
        total_pages = -(-self.total_bytes // self.page_size)
        pages = self.normal_pages + self.zero_pages + self.inline_pages
        planned: int | None
        round_no = self.rounds + self.in_round
        if self.role == "source":
            planned = self.round_planned_pages
            fraction = _share(self.round_done_pages, planned) if round_no else 0.0
        else:
            planned = None
            fraction = _share(pages, total_pages) if total_pages else 0.0
        return Progress(
            role=self.role,
            status=self.status,
            round=round_no,
            round_pages=planned,
            round_pages_done=self.round_done_pages,
            fraction=1.0 if self.status == "completed" else fraction,
            rounds_done=self.rounds,
            pages=pages,
            total_pages=total_pages,
            page_size=self.page_size,
            wire_bytes=self.wire_bytes,
            seconds=self.seconds,
            throughput=self.throughput,
        )

    # --- counting: the only writers of the fields above --------------------------------------

    def start(self, total_bytes: int | None = None) -> None:
        """The migration is set up (connections made, blocks known)."""
        self.status = "active"
        if total_bytes is not None:
            self.total_bytes = total_bytes

    def add_channel(self, channel: int) -> ChannelStats:
        """The counters of a new multifd channel."""
        cstats = ChannelStats(channel)
        self.per_channel.append(cstats)
        return cstats

    def packet(
        self,
        cstats: ChannelStats,
        *,
        normal_pages: int,
        header_bytes: int,
        payload_bytes: int,
        sync: bool,
        zero_pages: int = 0,
        checksum: bool = False,
    ) -> None:
        """One multifd packet sent or received on the channel counted by ``cstats``;
        ``checksum``: it carried a checksum (sealed by the source, checked by the destination)."""
        wire = header_bytes + payload_bytes
        cstats.packet(normal_pages, wire, sync)
        self.packets += 1
        self.checksum_packets += checksum
        self.normal_pages += normal_pages
        self.zero_pages += zero_pages
        self._round_pages(normal_pages + zero_pages)
        self.multifd_bytes += wire
        self.payload_bytes += payload_bytes

    def add_zero_pages(self, count: int) -> None:
        """``count`` pages sent or received as zero records of the main stream."""
        self.zero_pages += count
        self.zero_record_pages += count
        self._round_pages(count)

    def add_inline_pages(self, count: int) -> None:
        """``count`` pages carried whole in the main stream."""
        self.inline_pages += count
        self._round_pages(count)

    def add_main_bytes(self, count: int) -> None:
        """``count`` bytes sent or received on the main channel."""
        self.main_bytes += count

    def add_verified_blocks(self, count: int) -> None:
        """``count`` blocks' content digests sent (source) or checked (destination)."""
        self.verified_blocks += count

    def refuse_connection(self) -> None:
        """A connection that is not this migration's was closed (``accept.py``)."""
        self.refused_connections += 1

    def round_start(self, planned_pages: int) -> None:
        """Source: a round starts, to send ``planned_pages`` pages (its synced dirty bitmaps)."""
        self.in_round = True
        self.round_planned_pages = planned_pages
        self.round_done_pages = 0

    def _round_pages(self, count: int) -> None:
        """``count`` pages of the round done; on the destination, which is not told when a
        round starts, the first page after a round's end starts the next one."""
        if count and not self.in_round:
            self.in_round = True
            self.round_done_pages = 0
        self.round_done_pages += count

    def round_done(self) -> None:
        """A round ended with its sync barrier (see the module's doc)."""
        self.rounds += 1
        self.in_round = False

    def finish(self, status: MigrationStatus, error: BaseException | None = None) -> None:
        if self.ended is None:
            self.ended = time.monotonic()
            process, loop, thread = self.cpu_started
            same = threading.get_ident() == thread  # thread_time is the calling thread's
            self.cpu_seconds = (
                time.process_time() - process,
                time.thread_time() - loop if same else None,
            )
        self.status = status
        if error is not None:
            self.error = str(error) or type(error).__name__

    def as_dict(self) -> dict[str, Any]:
        secs = self.seconds
        out: dict[str, Any] = {
            "status": self.status,
            "role": self.role,
            "total-time": round(secs * 1000),
            "seconds": round(secs, 6),
            "channels": self.channels,
            "compression": self.method,
            "ram": {
                "total": self.total_bytes,
                "transferred": self.wire_bytes,
                "normal": self.normal_pages,
                "normal-bytes": self.normal_bytes,
                "duplicate": self.zero_pages,
                "inline": self.inline_pages,
                "page-size": self.page_size,
                "dirty-sync-count": self.rounds,
                "multifd-bytes": self.multifd_bytes,
                "main-bytes": self.main_bytes,
                "mbps": round(self.wire_bytes * 8 / secs / 1e6, 3) if secs > 0 else 0.0,
            },
            "packets": self.packets,
            "integrity": {
                "checksum-packets": self.checksum_packets,
                "verified-blocks": self.verified_blocks,
            },
            "throughput-bytes-per-second": round(self.throughput),
            "compression-ratio": round(self.compression_ratio, 4),
            "per-channel": [vars(c).copy() for c in self.per_channel],
            "refused-connections": self.refused_connections,
        }
        if self.cpu_seconds is not None:
            process, loop = self.cpu_seconds
            out["cpu-seconds"] = {
                "process": round(process, 4),
                "event-loop": None if loop is None else round(loop, 4),
            }
        if self.error:
            out["error-desc"] = self.error
        return out
