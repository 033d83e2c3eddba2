"""zlib compression for multifd-core: QEMU's ``multifd-compression=zlib`` (value 1).

Wire format (QEMU's ``migration/multifd-zlib.c``): each channel owns one deflate stream for its
whole life (zlib header ``78 01`` at level 1, 32 KiB window, never reset, never finished). A
packet's payload is the deflate output for its pages, fed in order, the last page with
``Z_SYNC_FLUSH``: so only the channel's first payload starts with the zlib header and every
payload ends with the empty stored block ``00 00 ff ff``. Later packets may refer back to
earlier packets' bytes, so a payload can only be decoded by its own channel's inflate stream.

The receiver inflates each payload into exactly the packet's pages and rejects anything else:
more or less output, input left over, a payload not ending at a sync-flush point, a finished
stream, or corrupt data. It never asks zlib for more than ``expected + 1`` bytes, so a
decompression bomb costs at most one page's worth of extra memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from multifd_core import MultiFDMethod, RecvContext, SendContext, hookimpl
from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.methods import StreamRecv, StreamSend, int_option, scatter

__all__ = ["ZlibMethod", "ZlibRecv", "ZlibSend", "multifd_methods"]

__version__ = "0.1.0"
#: The multifd hook API this plugin was written for (multifd_core.MULTIFD_HOOK_API).
MULTIFD_HOOK_API = 1

#: QEMU's default ``multifd-zlib-level``.
DEFAULT_LEVEL = 1
#: The empty stored block a Z_SYNC_FLUSH (or Z_FULL_FLUSH) ends with.
SYNC_MARKER = b"\x00\x00\xff\xff"


class ZlibSend(StreamSend):
    """One deflate stream for the channel's life; one sync flush per packet."""

    def __init__(self, level: int) -> None:
        # Same parameters as QEMU's deflateInit(level): window bits 15, memLevel 8, default
        # strategy, zlib wrapper.
        super().__init__("zlib", zlib.compressobj(level), zlib.Z_SYNC_FLUSH)


class ZlibRecv(StreamRecv):
    """One inflate stream for the channel's life; each payload must fill its pages exactly."""

    def __init__(self) -> None:
        super().__init__("zlib")
        self._d: Any = zlib.decompressobj()

    def decode(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        scatter(self._inflate(payload, pages), pages)

    def _inflate(self, payload: memoryview, pages: Sequence[memoryview]) -> memoryview:
        d = self._d
        if d is None:
            raise DecompressionError("zlib receive context used after recv_cleanup")
        expected = sum(len(p) for p in pages)
        size = len(payload)
        # QEMU ends every payload with Z_SYNC_FLUSH: checking for its marker catches a payload
        # cut short or followed by stray bytes right here, rather than as a puzzling error in
        # the channel's next packet.
        if payload[-4:] != SYNC_MARKER:
            raise DecompressionError(
                f"zlib payload of {size} bytes does not end at a sync flush (00 00 ff ff): "
                "truncated or followed by extra bytes"
            )
        try:
            # Ask for one byte more than the pages hold: getting it proves the payload inflates
            # to too much, and not getting it proves zlib has nothing more to give (output space
            # was left, so inflate stopped for want of input). Memory stays ~expected.
            out = d.decompress(payload, expected + 1)
        except zlib.error as exc:
            raise DecompressionError(f"corrupt zlib payload ({size} bytes): {exc}") from None
        got = len(out)
        if got > expected:
            raise DecompressionError(
                f"zlib payload ({size} bytes) inflates to more than the {expected} bytes "
                "of its pages"
            )
        if d.eof:
            raise DecompressionError(
                f"zlib payload ({size} bytes) ends the deflate stream (final block); a channel's "
                "stream must stay open"
            )
        if got < expected:
            raise DecompressionError(
                f"zlib payload ({size} bytes) inflates to {got} bytes, its pages need {expected}"
            )
        if d.unconsumed_tail:  # cannot happen when output space was left; kept as a guard
            raise DecompressionError(
                f"zlib payload has {len(d.unconsumed_tail)} bytes left after its pages"
            )
        return memoryview(out)

    def recv_cleanup(self) -> None:
        self._d = None


class ZlibMethod(MultiFDMethod):
    """zlib, compatible with QEMU's ``multifd-compression=zlib``.

    Option ``level``: 0..9, default 1 (QEMU's ``multifd-zlib-level`` default). The receiver
    accepts any level.
    """

    name = "zlib"
    value = 1
    threaded = True

    def __init__(self, **options: Any) -> None:
        opts = dict(options)
        self.level = int_option(opts, "zlib", "level", DEFAULT_LEVEL, 0, 9)
        if opts:
            raise ConfigError(f"zlib takes the option 'level' only, got {sorted(opts)}")
        self.options = {"level": self.level}

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        # zlib's compressBound is raw + raw/4096 + raw/16384 + 13; the sync flush adds at most
        # 6 bytes. zlib-ng (the system zlib of some distributions, so of their QEMU) encodes
        # level 1 with static Huffman codes only: at worst 9 bits a byte, raw/8 more. Accept
        # that, plus room for block headers and the flush.
        return 1, raw_len + (raw_len >> 3) + 1024

    def send_setup(self, channel: int) -> SendContext:
        return ZlibSend(self.level)

    def recv_setup(self, channel: int) -> RecvContext:
        return ZlibRecv()


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [ZlibMethod]
