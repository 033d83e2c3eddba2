"""bz2 compression for multifd-core: a minimal third-party plugin, for learning from.

It is the example that ``docs/writing-a-plugin.md`` walks through. It adds the method ``bz2``
with compression value 4 (flags ``0x8``), free in QEMU 7.x's 3-bit compression field (QEMU 9.1+
spends the bit ``0x8`` on its ``qpl`` method): only multifd-core peers with this plugin installed
speak it.

Payload format: each packet's payload is one complete, independent bzip2 stream (what
``bz2.compress`` makes: ``BZh`` header, blocks, end-of-stream marker and stream CRC) holding the
packet's normal pages concatenated in the order of the packet's offsets. Both sizes come from
the packet header (``next_packet_size`` and ``normal_pages * page_size``). No state is carried
from one packet to the next, so the per-channel contexts only remember the level.

It uses nothing but the standard library's ``bz2`` module, which releases the GIL while it
compresses and decompresses, so ``threaded = True`` lets several channels work in parallel. It
imports only public names of multifd-core.
"""

from __future__ import annotations

import bz2
from collections.abc import Iterable, Sequence
from typing import Any

from multifd_core import MultiFDMethod, RecvContext, SendContext, hookimpl, scatter
from multifd_core.errors import ConfigError, DecompressionError

__all__ = ["Bz2Method", "Bz2Recv", "Bz2Send", "compress_bound", "multifd_methods"]

__version__ = "0.1.0"
#: The multifd hook API this plugin was written for (multifd_core.MULTIFD_HOOK_API).
MULTIFD_HOOK_API = 1

#: bz2's block size of 100 KB. On 512 KiB packets level 9 (bz2's own default) compresses VM-like
#: pages only ~2 % smaller, at about the same speed, for three times the compressor memory
#: (~9 MB instead of ~3 MB for each packet being compressed).
DEFAULT_LEVEL = 1


def compress_bound(raw_len: int) -> int:
    """The largest bzip2 stream of ``raw_len`` bytes: 1 % more plus 600 bytes (bzip2 manual)."""
    return raw_len + raw_len // 100 + 600


def parse_level(raw: object) -> int:
    """The ``level`` option: an int, or a string from the CLI's ``-o level=N``; 1..9."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ConfigError(f"bz2 option level={raw!r} is not an integer")
    try:
        level = int(raw)
    except ValueError:
        raise ConfigError(f"bz2 option level={raw!r} is not an integer") from None
    if not 1 <= level <= 9:
        raise ConfigError(f"bz2 option level={level} is outside 1..9")
    return level


class Bz2Send(SendContext):
    """One channel's sender: a fresh bz2 stream per packet, so all it keeps is the level."""

    def __init__(self, level: int) -> None:
        self.level = level

    def send_prepare(self, pages: Sequence[memoryview]) -> list[bytes]:
        # ``pages`` are views of the source's memory, contiguous pages joined into one view.
        # Feeding them one by one saves joining them first; the parts are sent in order.
        compressor = bz2.BZ2Compressor(self.level)
        parts = [out for run in pages if (out := compressor.compress(run))]
        parts.append(compressor.flush())  # the rest of the data and the end of the stream
        return parts


class Bz2Recv(RecvContext):
    """One channel's receiver: decodes each payload, on its own, into exactly its pages."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        expected = sum(len(p) for p in pages)
        size = len(payload)
        decompressor = bz2.BZ2Decompressor()
        try:
            # Never ask for more than one byte beyond the pages: getting that byte proves the
            # payload is too long, and a decompression bomb costs at most ``expected + 1``
            # bytes of output.
            out = decompressor.decompress(payload, max_length=expected + 1)
        except OSError as exc:  # bz2's "Invalid data stream": bad data or a CRC mismatch
            raise DecompressionError(
                f"corrupt bz2 payload ({size} bytes, pages need {expected}): {exc}"
            ) from None
        if len(out) > expected:
            raise DecompressionError(
                f"bz2 payload ({size} bytes) decompresses to more than the {expected} bytes "
                "of its pages"
            )
        if not decompressor.eof:
            # Output space was left, so bz2 stopped for want of input: the stream is cut short.
            raise DecompressionError(
                f"bz2 payload ({size} bytes) is truncated: no end of stream after {len(out)} bytes"
            )
        if len(out) < expected:
            raise DecompressionError(
                f"bz2 payload ({size} bytes) decompresses to {len(out)} bytes, its pages need "
                f"{expected}"
            )
        if decompressor.unused_data:
            raise DecompressionError(
                f"bz2 payload has {len(decompressor.unused_data)} bytes after the end of its stream"
            )
        # Only now, with the whole stream checked (CRCs included), touch the pages.
        scatter(out, pages)


class Bz2Method(MultiFDMethod):
    """bz2, one independent stream per packet (an example; not a QEMU method).

    Option ``level``: 1..9, bz2's block size in units of 100 KB (default 1: the least memory). The
    receiver decodes every level alike.
    """

    name = "bz2"
    value = 4  # free in QEMU 7.x's field: flags = 4 << 1 = 0x8
    threaded = True  # bz2 releases the GIL: send_prepare / recv_pages run in worker threads

    def __init__(self, **options: Any) -> None:
        opts = dict(options)
        self.level = parse_level(opts.pop("level", DEFAULT_LEVEL))
        if opts:
            raise ConfigError(f"bz2 takes the option 'level' only, got {sorted(opts)}")
        self.options = {"level": self.level}

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        # The receiver refuses a packet whose next_packet_size is outside this range before
        # reading its payload, and sizes each channel's payload buffer by the upper bound.
        return 1, compress_bound(raw_len)

    def send_setup(self, channel: int) -> SendContext:
        return Bz2Send(self.level)

    def recv_setup(self, channel: int) -> RecvContext:
        return Bz2Recv()


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [Bz2Method]
