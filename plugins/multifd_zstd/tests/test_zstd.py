"""Tests of the zstd method: one never-ending frame per channel, and a bounded receiver."""

from __future__ import annotations

import random
import time
import tracemalloc
from typing import ClassVar

import pytest
import zstandard
from multifd_zstd import BLOCK_MAX, ZstdMethod, ZstdRecv, ZstdSend, compress_bound

from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.testing import StreamChecks, conformance_classes, context_pair
from multifd_core.testing.pages import (
    PAGE,
    mixed_pages,
    prepare_payload,
    random_runs,
    receive_payload,
)


def pair(**options: object) -> tuple[ZstdSend, ZstdRecv]:
    return context_pair(ZstdMethod(**options), ZstdSend, ZstdRecv)


def block(block_type: int, size: int, content: bytes = b"", last: bool = False) -> bytes:
    """A zstd block header (3 bytes, little-endian) followed by ``content``."""
    return (size << 3 | block_type << 1 | int(last)).to_bytes(3, "little") + content


#: A frame header: magic, descriptor 0 (no checksum, dictionary or content size), window 1 MiB.
FRAME_HEADER = b"\x28\xb5\x2f\xfd\x00" + bytes([(20 - 10) << 3])


# --- the kit: multifd_core's conformance kit and the checks every plugin shares -----------------


TestZstdConformance, TestZstdConformanceOtherLevel = conformance_classes(
    ZstdMethod, {}, {"level": "3"}
)


class TestZstdPlugin(StreamChecks):
    """Registration, zero/random/text pages (128 zero pages in under 256 bytes), two interleaved
    channels, history (a payload without the frame header is refused), the engine by name."""

    name, value, distribution = "zstd", 2, "multifd-zstd"
    engine_options: ClassVar = {"level": "3"}
    zero_payload_limit = 256
    own_stream_match = "frame header"

    def make_method(self, **options: object) -> ZstdMethod:
        return ZstdMethod(**options)

    def test_payload_needs_its_own_stream(self) -> None:
        super().test_payload_needs_its_own_stream()
        send, _ = pair()
        pages = mixed_pages(32, 11)
        prepare_payload(send, pages)
        second = prepare_payload(send, pages)  # no frame header, refers back to the first
        # a frame header alone does not help: the back-references point at nothing
        with pytest.raises(DecompressionError):
            receive_payload(ZstdRecv(), FRAME_HEADER + second, 32)


# --- options ----------------------------------------------------------------------------------


def test_options() -> None:
    assert ZstdMethod().level == 1
    assert ZstdMethod(level="19").level == 19
    assert ZstdMethod(level=-3).options == {"level": -3}
    for bad in ({"level": 21}, {"level": -8}, {"level": "max"}, {"level": False}, {"x": 1}):
        with pytest.raises(ConfigError):
            ZstdMethod(**bad)


def test_payload_size_bounds_real_payloads() -> None:
    low, high = ZstdMethod().payload_size(128 * PAGE)
    assert low == 1 and high == compress_bound(128 * PAGE) + 1024
    send, _ = pair()
    rng = random.Random(1)
    for _ in range(3):  # incompressible pages, the first with the frame header
        assert len(prepare_payload(send, [rng.randbytes(PAGE) for _ in range(128)])) <= high
    assert len(prepare_payload(send, [rng.randbytes(PAGE)])) <= ZstdMethod().payload_size(PAGE)[1]


# --- the stream ---------------------------------------------------------------------------------


def test_one_frame_per_channel_flushed_per_packet() -> None:
    packets = [mixed_pages(128, seed) for seed in range(4)] + [
        mixed_pages(1, 9),
        mixed_pages(37, 10),
    ]
    send, recv = pair()
    payloads = [
        prepare_payload(send, pages, random_runs(len(pages), random.Random(i)))
        for i, pages in enumerate(packets)
    ]
    assert payloads[0].startswith(b"\x28\xb5\x2f\xfd")
    assert not any(p.startswith(b"\x28\xb5\x2f\xfd") for p in payloads[1:])
    # each payload decodes in full as soon as it arrives: a standard zstd stream decoder fed the
    # payloads one by one returns each packet's pages at once
    dobj = zstandard.ZstdDecompressor().decompressobj()
    for pages, payload in zip(packets, payloads, strict=True):
        assert dobj.decompress(payload) == b"".join(pages)
    assert not dobj.eof  # the frame goes on
    for pages, payload in zip(packets, payloads, strict=True):
        assert receive_payload(recv, payload, len(pages)) == b"".join(pages)


def test_levels_round_trip() -> None:
    pages = mixed_pages(64, 3)
    for level in (-7, 0, 3, 19, 20):
        send, recv = pair(level=level)
        for _ in range(2):
            assert receive_payload(recv, prepare_payload(send, pages), 64) == b"".join(pages)


# --- hostile payloads --------------------------------------------------------------------------


def measure(fn: object) -> tuple[float, int]:
    tracemalloc.start()
    try:
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return elapsed, peak


def test_bomb_from_compressor_fails_fast_and_bounded() -> None:
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join(cobj.compress(zeros) for _ in range(256)) + cobj.flush(
        zstandard.COMPRESSOBJ_FLUSH_BLOCK
    )
    assert len(bomb) < 64 << 10  # 256 MiB

    def run() -> None:
        with pytest.raises(DecompressionError, match="more than"):
            receive_payload(ZstdRecv(), bomb, 1)

    elapsed, peak = measure(run)
    assert elapsed < 0.5
    assert peak < PAGE + 3 * BLOCK_MAX


def test_rle_bomb_fails_fast_and_bounded() -> None:
    # 8192 RLE blocks of 128 KiB: a 32 KiB payload regenerating 1 GiB
    bomb = FRAME_HEADER + block(1, BLOCK_MAX, b"\x00") * 8192
    recv = ZstdRecv()

    def run() -> None:
        with pytest.raises(DecompressionError, match="more than"):
            receive_payload(recv, bomb, 128)

    elapsed, peak = measure(run)
    assert elapsed < 0.5
    assert peak < 128 * PAGE + 3 * BLOCK_MAX  # the test's 512 KiB of pages, 256 KiB at most


def test_exact_raw_and_rle_blocks_accepted() -> None:
    data = b"abc" * 1000 + bytes(PAGE * 2 - 3000)
    payload = FRAME_HEADER + block(0, 3000, data[:3000]) + block(1, PAGE * 2 - 3000, b"\x00")
    assert receive_payload(ZstdRecv(), payload, 2) == data


def test_window_too_large_refused() -> None:
    huge = b"\x28\xb5\x2f\xfd\x00" + bytes([(30 - 10) << 3])  # a 1 GiB window
    with pytest.raises(DecompressionError, match="corrupt"):
        receive_payload(ZstdRecv(), huge + block(1, PAGE, b"\x00"), 1)


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 100])
def test_truncated(cut: int) -> None:
    send, recv = pair()
    pages = mixed_pages(8, 14)
    assert receive_payload(recv, prepare_payload(send, pages), 8) == b"".join(pages)
    payload = prepare_payload(send, pages)
    with pytest.raises(DecompressionError):
        receive_payload(recv, payload[:-cut], 8)


def test_truncated_frame_header() -> None:
    with pytest.raises(DecompressionError):
        receive_payload(ZstdRecv(), b"\x28\xb5\x2f\xfd\x40", 1)
    with pytest.raises(DecompressionError):
        receive_payload(
            ZstdRecv(), b"\x28\xb5\x2f\xfd\xc0\x00\x00", 1
        )  # 8-byte content size cut short


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00", block(1, 10, b"x"), bytes(range(40))])
def test_trailing_bytes(extra: bytes) -> None:
    send, recv = pair()
    pages = mixed_pages(8, 15)
    with pytest.raises(DecompressionError):
        receive_payload(recv, prepare_payload(send, pages) + extra, 8)


def test_trailing_empty_block_is_valid_data() -> None:
    # an empty raw block is well-formed zstd regenerating nothing: accepted, as QEMU does
    send, recv = pair()
    pages = mixed_pages(8, 16)
    assert receive_payload(recv, prepare_payload(send, pages) + block(0, 0), 8) == b"".join(pages)
    assert receive_payload(recv, prepare_payload(send, pages), 8) == b"".join(pages)


def test_last_block_refused() -> None:
    payload = FRAME_HEADER + block(1, PAGE, b"\x07", last=True)
    with pytest.raises(DecompressionError, match="last block"):
        receive_payload(ZstdRecv(), payload, 1)
    cctx = zstandard.ZstdCompressor(level=1)
    with pytest.raises(DecompressionError, match="last block"):
        receive_payload(ZstdRecv(), cctx.compress(bytes(PAGE)), 1)


def test_corrupt() -> None:
    send, recv = pair()
    pages = mixed_pages(8, 18)
    first = prepare_payload(send, pages)
    with pytest.raises(DecompressionError, match="frame header"):
        receive_payload(ZstdRecv(), b"\x29" + first[1:], 8)
    with pytest.raises(DecompressionError, match="reserved"):
        receive_payload(ZstdRecv(), FRAME_HEADER + block(3, 4, b"abcd"), 1)
    with pytest.raises(DecompressionError, match="over the"):
        receive_payload(ZstdRecv(), FRAME_HEADER + block(0, BLOCK_MAX + 1), 1)
    assert receive_payload(recv, first, 8) == b"".join(pages)
    rng = random.Random(19)
    for _ in range(20):  # garbage inside well-formed compressed block headers
        content = rng.randbytes(2000)
        with pytest.raises(DecompressionError):
            receive_payload(ZstdRecv(), FRAME_HEADER + block(2, len(content), content), 8)


def test_empty_payload() -> None:
    with pytest.raises(DecompressionError):
        receive_payload(ZstdRecv(), b"", 1)
    send, recv = pair()
    receive_payload(recv, prepare_payload(send, mixed_pages(1, 21)), 1)
    with pytest.raises(DecompressionError):
        receive_payload(recv, b"", 1)
