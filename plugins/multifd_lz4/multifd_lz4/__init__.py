"""lz4 compression for multifd-core (value 3; QEMU has no lz4 multifd method).

Payload format (README.md has the full specification): exactly one LZ4 *block* (the raw block
format of ``LZ4_compress_fast``, no frame, no size prefix) holding the packet's normal pages
concatenated in the order of the packet's offsets. Both sizes come from the packet header: the
compressed size is ``next_packet_size``, the decompressed size ``normal_pages * page_size``.
Packets are independent (no dictionary, no history across packets), so either side keeps no
stream state and any receive context can decode any packet.

The receiver decodes with ``LZ4_decompress_safe`` into a buffer of exactly the pages' size,
which rejects output that would overrun it, input that does not end exactly where the block
ends, and malformed sequences; it then checks the output filled the pages exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lz4.block  # type: ignore[import-untyped]

from multifd_core import Buffer, MultiFDMethod, RecvContext, SendContext, hookimpl
from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.methods import int_option, scatter

__all__ = ["Lz4Method", "Lz4Recv", "Lz4Send", "compress_bound", "multifd_methods"]

__version__ = "0.1.0"
#: The multifd hook API this plugin was written for (multifd_core.MULTIFD_HOOK_API).
MULTIFD_HOOK_API = 1

#: LZ4_ACCELERATION_MAX.
MAX_ACCELERATION = 65537


def compress_bound(raw_len: int) -> int:
    """LZ4_COMPRESSBOUND: the largest block LZ4 makes of ``raw_len`` bytes."""
    return raw_len + raw_len // 255 + 16


class Lz4Send(SendContext):
    """Compresses each packet's pages, joined, into one LZ4 block."""

    def __init__(self, acceleration: int, level: int) -> None:
        if level:
            self._kwargs: dict[str, Any] = {"mode": "high_compression", "compression": level}
        else:
            self._kwargs = {"mode": "fast", "acceleration": acceleration}

    def send_prepare(self, pages: Sequence[memoryview]) -> Sequence[Buffer]:
        # One block per packet: one call into C per packet, and matches across page borders.
        # Pages that are one contiguous run are compressed in place; others are joined first
        # (a memcpy, ~5% of the compression time).
        data = pages[0] if len(pages) == 1 else b"".join(pages)
        return [lz4.block.compress(data, store_size=False, **self._kwargs)]


class Lz4Recv(RecvContext):
    """Decodes each packet's block into exactly its pages."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        expected = sum(len(p) for p in pages)
        size = len(payload)
        if not 1 <= size <= compress_bound(expected):
            raise DecompressionError(
                f"lz4 payload of {size} bytes for {expected} bytes of pages, expected "
                f"1..{compress_bound(expected)}"
            )
        try:
            # LZ4_decompress_safe(payload, out, size, expected): bounded by ``expected``, and
            # an error unless the block ends exactly at the payload's end.
            out = lz4.block.decompress(payload, uncompressed_size=expected)
        except lz4.block.LZ4BlockError as exc:
            raise DecompressionError(
                f"corrupt lz4 payload ({size} bytes, pages need {expected}): {exc}"
            ) from None
        if len(out) != expected:
            raise DecompressionError(
                f"lz4 payload ({size} bytes) decompresses to {len(out)} bytes, its pages need "
                f"{expected}"
            )
        scatter(out, pages)


class Lz4Method(MultiFDMethod):
    """lz4 block per packet (multifd-core's own format, see the README).

    Options: ``acceleration`` 1..65537 (default 1: LZ4_compress_default; higher is faster and
    compresses less), or ``level`` 1..12 for LZ4-HC (slower, smaller; default 0 = off). The
    receiver decodes all of them alike.
    """

    name = "lz4"
    value = 3
    threaded = True

    def __init__(self, **options: Any) -> None:
        opts = dict(options)
        self.acceleration = int_option(opts, "lz4", "acceleration", 1, 1, MAX_ACCELERATION)
        self.level = int_option(opts, "lz4", "level", 0, 0, 12)
        if opts:
            raise ConfigError(
                f"lz4 takes the options 'acceleration' and 'level', got {sorted(opts)}"
            )
        if self.level and self.acceleration != 1:
            raise ConfigError("lz4 options 'acceleration' and 'level' (LZ4-HC) exclude each other")
        self.options = {"acceleration": self.acceleration, "level": self.level}

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        return 1, compress_bound(raw_len)

    def send_setup(self, channel: int) -> SendContext:
        return Lz4Send(self.acceleration, self.level)

    def recv_setup(self, channel: int) -> RecvContext:
        return Lz4Recv()


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [Lz4Method]
