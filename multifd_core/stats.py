"""Migration statistics, shaped like QEMU's query-migrate. A leaf module.

Every counter changes through one method of these classes (``packet``, ``add_zero_pages``,
``round_done``, ...), called by the engine at the one place each event happens; no other module
assigns a field. Both ends count the same things the same way: a *round* is one pass over the
dirty pages that ends in a sync barrier (``send_round()`` / ``complete()`` on the source, the
matching end-of-round in the main stream on the destination); the sync of the setup, before any
page, is not a round.
"""

from __future__ import annotations

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
    error: str | None = None
    per_channel: list[ChannelStats] = field(default_factory=list)

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
        self.multifd_bytes += wire
        self.payload_bytes += payload_bytes

    def add_zero_pages(self, count: int) -> None:
        """``count`` pages sent or received as zero records of the main stream."""
        self.zero_pages += count
        self.zero_record_pages += count

    def add_inline_pages(self, count: int) -> None:
        """``count`` pages carried whole in the main stream."""
        self.inline_pages += count

    def add_main_bytes(self, count: int) -> None:
        """``count`` bytes sent or received on the main channel."""
        self.main_bytes += count

    def add_verified_blocks(self, count: int) -> None:
        """``count`` blocks' content digests sent (source) or checked (destination)."""
        self.verified_blocks += count

    def refuse_connection(self) -> None:
        """A connection that is not this migration's was closed (``accept.py``)."""
        self.refused_connections += 1

    def round_done(self) -> None:
        """A round ended with its sync barrier (see the module's doc)."""
        self.rounds += 1

    def finish(self, status: MigrationStatus, error: BaseException | None = None) -> None:
        if self.ended is None:
            self.ended = time.monotonic()
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
        if self.error:
            out["error-desc"] = self.error
        return out
