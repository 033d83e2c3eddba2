"""zstd compression for multifd-core: QEMU's ``multifd-compression=zstd`` (value 2).

Wire format (QEMU's ``migration/multifd-zstd.c``): each channel owns one zstd compression
stream for its whole life, writing one frame that never ends. A packet's payload is the stream's
output for its pages, fed in order, the last with ``ZSTD_e_flush``: whole zstd blocks, never the
last block of the frame; the channel's first payload also carries the frame header. Blocks may
refer back to earlier packets' bytes (the window), so a payload can only be decoded by its own
channel's decompression stream.

The receiver bounds its work before zstd runs: it walks the payload's block headers (3 bytes
each) and checks the payload is whole blocks of a frame that goes on. A block regenerates at
most 128 KiB (``ZSTD_BLOCKSIZE_MAX``), exactly its size for raw and RLE blocks, so blocks are
fed to the channel's decompressor in groups that cannot regenerate more than 128 KiB, and each
group's output is checked against the room left in the pages before it is copied into them. A
crafted payload that would inflate to gigabytes therefore costs at most ~256 KiB of temporary
memory whatever the packet's size, and fails as soon as it passes the pages. The
decompressor's window is capped at 32 MiB (what QEMU's highest level, 20, uses).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import zstandard

from multifd_core import MultiFDMethod, RecvContext, SendContext, hookimpl
from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.methods import StreamRecv, StreamSend, int_option

__all__ = ["ZstdMethod", "ZstdRecv", "ZstdSend", "multifd_methods"]

__version__ = "0.1.0"
#: The multifd hook API this plugin was written for (multifd_core.MULTIFD_HOOK_API).
MULTIFD_HOOK_API = 1

#: QEMU's default ``multifd-zstd-level``.
DEFAULT_LEVEL = 1
#: QEMU accepts levels 0..20; 20 is also the highest whose window (32 MiB) receivers accept.
MIN_LEVEL, MAX_LEVEL = -7, 20
#: The largest window a receiver accepts (window log 25: QEMU's level 20).
MAX_WINDOW_SIZE = 1 << 25
#: ZSTD_BLOCKSIZE_MAX: the most a block can regenerate.
BLOCK_MAX = 128 * 1024
#: ZSTD_MAGICNUMBER, little-endian on the wire.
FRAME_MAGIC = b"\x28\xb5\x2f\xfd"


def compress_bound(raw_len: int) -> int:
    """ZSTD_compressBound: the largest single-frame output for ``raw_len`` input bytes."""
    margin = (BLOCK_MAX - raw_len) >> 11 if raw_len < BLOCK_MAX else 0
    return raw_len + (raw_len >> 8) + margin


def frame_header_size(payload: memoryview) -> int:
    """Size of the zstd frame header ``payload`` starts with (RFC 8878, 3.1.1.1)."""
    if len(payload) < 6 or payload[:4] != FRAME_MAGIC:
        raise DecompressionError(
            "the channel's first zstd payload does not start with a zstd frame header "
            f"(got {bytes(payload[:4]).hex(' ') or 'nothing'}); was it cut from another stream?"
        )
    fhd = payload[4]
    single_segment = (fhd >> 5) & 1
    dict_id_size = (0, 1, 2, 4)[fhd & 3]
    content_size_size = (single_segment, 2, 4, 8)[fhd >> 6]
    size = 5 + (0 if single_segment else 1) + dict_id_size + content_size_size
    if size > len(payload):
        raise DecompressionError(f"zstd frame header truncated ({len(payload)} of {size} bytes)")
    return size


def block_span(payload: memoryview, pos: int) -> tuple[int, int]:
    """The zstd block whose header is at ``pos``: where it ends, and the most it regenerates.
    Refuses the frame's last block (a channel's frame never ends), the reserved type, a block
    over BLOCK_MAX and one that does not fit in ``payload``."""
    size = len(payload)
    if size - pos < 3:
        raise DecompressionError(
            f"zstd payload ({size} bytes) ends inside a block header: truncated, or "
            "followed by extra bytes"
        )
    header = payload[pos] | payload[pos + 1] << 8 | payload[pos + 2] << 16
    block_type = (header >> 1) & 3
    block_size = header >> 3
    if header & 1:
        raise DecompressionError(
            "zstd payload holds the frame's last block; a channel's frame must stay open"
        )
    if block_type == 3:
        raise DecompressionError(f"zstd payload has a reserved block type at byte {pos}")
    if block_size > BLOCK_MAX:
        raise DecompressionError(
            f"zstd block of {block_size} bytes at byte {pos}, over the {BLOCK_MAX} maximum"
        )
    if block_type == 1:  # RLE: one byte, repeated block_size times
        end, most = pos + 4, block_size
    elif block_type == 0:  # raw
        end, most = pos + 3 + block_size, block_size
    else:  # compressed: regenerates at most BLOCK_MAX
        end, most = pos + 3 + block_size, BLOCK_MAX
    if end > size:
        raise DecompressionError(
            f"zstd payload ({size} bytes) ends inside a block (byte {pos}, needs {end}): "
            "truncated, or followed by extra bytes"
        )
    return end, most


def _feed(
    d: Any, payload: memoryview, start: int, end: int, out: _PageWriter, expected: int
) -> None:
    """Decompress ``payload[start:end]`` (whole blocks) into the pages, refusing more output
    than the ``expected`` bytes of the packet's pages."""
    try:
        chunk = d.decompress(payload[start:end])
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"corrupt zstd payload ({len(payload)} bytes): {exc}") from None
    if out.written + len(chunk) > expected:
        raise DecompressionError(
            f"zstd payload ({len(payload)} bytes) decompresses to more than the {expected} "
            "bytes of its pages"
        )
    out.write(chunk)


class ZstdSend(StreamSend):
    """One compression stream (one never-ending frame) per channel, flushed per packet."""

    def __init__(self, level: int) -> None:
        # One ZstdCompressor per channel: compressobj() resets the compressor's context, so
        # two channels must not share one.
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=False)
        super().__init__("zstd", cctx.compressobj(), zstandard.COMPRESSOBJ_FLUSH_BLOCK)


class ZstdRecv(StreamRecv):
    """One decompression stream per channel; each payload must fill its pages exactly."""

    def __init__(self) -> None:
        super().__init__("zstd")
        # One ZstdDecompressor per channel, for the same reason as on the send side.
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
        self._d: Any = dctx.decompressobj(read_across_frames=False)
        self._started = False

    def decode(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        self._decompress(payload, pages)

    def _decompress(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        d = self._d
        if d is None:
            raise DecompressionError("zstd receive context used after recv_cleanup")
        expected = sum(len(p) for p in pages)
        size = len(payload)
        pos = 0
        if not self._started:
            pos = frame_header_size(payload)
            self._started = True
        out = _PageWriter(pages)
        start = 0  # the first byte of the group of blocks not yet fed to zstd
        bound = 0  # the most that group can regenerate
        while pos < size:
            end, most = block_span(payload, pos)
            # Feed whole blocks, at most BLOCK_MAX of possible output at a time: each call
            # then returns one chunk of at most 128 KiB, checked before it is written.
            if bound and bound + most > BLOCK_MAX:
                _feed(d, payload, start, pos, out, expected)
                start, bound = pos, 0
            bound += most
            pos = end
        if start < size:
            _feed(d, payload, start, size, out, expected)
        if out.written != expected:
            raise DecompressionError(
                f"zstd payload ({size} bytes) decompresses to {out.written} bytes, its pages "
                f"need {expected}"
            )

    def recv_cleanup(self) -> None:
        self._d = None


class _PageWriter:
    """Writes a stream of chunks into a sequence of page views, in order."""

    def __init__(self, pages: Sequence[memoryview]) -> None:
        self._pages = iter(pages)
        self._page: memoryview | None = None
        self._at = 0
        self.written = 0

    def write(self, chunk: bytes) -> None:
        """Copy ``chunk`` on; the caller checks it fits in the pages left."""
        src = memoryview(chunk)
        size = len(src)
        self.written += size
        page, at, pos = self._page, self._at, 0
        while pos < size:
            if page is None or at == len(page):
                page = next(self._pages)
                at = 0
            n = min(len(page) - at, size - pos)
            page[at : at + n] = src[pos : pos + n]
            at += n
            pos += n
        self._page, self._at = page, at


class ZstdMethod(MultiFDMethod):
    """zstd, compatible with QEMU's ``multifd-compression=zstd``.

    Option ``level``: -7..20, default 1 (QEMU's ``multifd-zstd-level`` default; QEMU offers
    0..20). The receiver accepts any level whose window is at most 32 MiB.
    """

    name = "zstd"
    value = 2
    threaded = True

    def __init__(self, **options: Any) -> None:
        opts = dict(options)
        self.level = int_option(opts, "zstd", "level", DEFAULT_LEVEL, MIN_LEVEL, MAX_LEVEL)
        if opts:
            raise ConfigError(f"zstd takes the option 'level' only, got {sorted(opts)}")
        self.options = {"level": self.level}

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        # ZSTD_compressBound covers the blocks (3-byte headers, raw fallback); add the frame
        # header (at most 18 bytes, first packet) and the blocks a flush may close early.
        return 1, compress_bound(raw_len) + 1024

    def send_setup(self, channel: int) -> SendContext:
        return ZstdSend(self.level)

    def recv_setup(self, channel: int) -> RecvContext:
        return ZstdRecv()


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [ZstdMethod]
