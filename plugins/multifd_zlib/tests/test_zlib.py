"""Tests of the zlib method: QEMU's bytes, stream history, and a receiver that trusts nothing."""

from __future__ import annotations

import random
import time
import tracemalloc
import zlib
from typing import ClassVar

import pytest
from multifd_zlib import ZlibMethod, ZlibRecv, ZlibSend

from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.testing import StreamChecks, conformance_classes, context_pair
from multifd_core.testing.pages import (
    PAGE,
    mixed_pages,
    prepare_payload,
    random_runs,
    receive_payload,
)


def pair() -> tuple[ZlibSend, ZlibRecv]:
    return context_pair(ZlibMethod(), ZlibSend, ZlibRecv)


# --- the kit: multifd_core's conformance kit and the checks every plugin shares -----------------


TestZlibConformance, TestZlibConformanceOtherLevel = conformance_classes(
    ZlibMethod, {}, {"level": "3"}
)


class TestZlibPlugin(StreamChecks):
    """Registration, zero/random/text pages (128 zero pages under 4 KiB: level 1 matches are at
    most 258 bytes, ~230:1), two interleaved channels, history, the engine by name."""

    name, value, distribution = "zlib", 1, "multifd-zlib"
    engine_options: ClassVar = {"level": "6"}
    less_output_match = "inflates to 12288 bytes"

    def make_method(self, **options: object) -> ZlibMethod:
        return ZlibMethod(**options)


# --- options ----------------------------------------------------------------------------------


def test_options() -> None:
    assert ZlibMethod().level == 1
    assert ZlibMethod(level="9").level == 9
    assert ZlibMethod(level=0).options == {"level": 0}
    for bad in ({"level": 10}, {"level": -1}, {"level": "fast"}, {"level": True}, {"lvl": 1}):
        with pytest.raises(ConfigError):
            ZlibMethod(**bad)


def test_payload_size_bounds_real_payloads() -> None:
    method = ZlibMethod()
    low, high = method.payload_size(128 * PAGE)
    assert low == 1 and 128 * PAGE < high < 128 * PAGE * 5 // 4
    send, _ = pair()
    rng = random.Random(1)
    for _ in range(3):  # incompressible pages: the worst case
        size = len(prepare_payload(send, [rng.randbytes(PAGE) for _ in range(128)]))
        assert size <= high
        assert size <= 128 * PAGE + (128 * PAGE >> 12) + (128 * PAGE >> 14) + 13 + 6


# --- QEMU's bytes -----------------------------------------------------------------------------


def test_golden_payloads_equal_qemu_stream() -> None:
    packets = [mixed_pages(128, seed) for seed in range(4)] + [
        mixed_pages(1, 9),
        mixed_pages(37, 10),
    ]
    send, recv = pair()
    ref = zlib.compressobj(1)
    payloads = []
    for i, pages in enumerate(packets):
        runs = random_runs(len(pages), random.Random(i))
        payload = prepare_payload(send, pages, runs)
        assert payload == ref.compress(b"".join(pages)) + ref.flush(zlib.Z_SYNC_FLUSH)
        assert payload.endswith(b"\x00\x00\xff\xff")
        payloads.append(payload)
    assert payloads[0].startswith(b"\x78\x01")
    # the header appears once per channel: later payloads continue the stream
    assert not any(p.startswith(b"\x78\x01") for p in payloads[1:])
    # the whole channel is one zlib stream
    assert zlib.decompressobj().decompress(b"".join(payloads)) == b"".join(map(b"".join, packets))
    for pages, payload in zip(packets, payloads, strict=True):
        assert receive_payload(recv, payload, len(pages)) == b"".join(pages)


def test_level_option_changes_stream() -> None:
    pages = mixed_pages(64, 3)
    send = ZlibMethod(level=9).send_setup(0)
    payload = b"".join(send.send_prepare([memoryview(p) for p in pages]))
    ref = zlib.compressobj(9)
    assert payload == ref.compress(b"".join(pages)) + ref.flush(zlib.Z_SYNC_FLUSH)
    assert payload.startswith(b"\x78\xda")
    assert receive_payload(ZlibRecv(), payload, 64) == b"".join(pages)


# --- hostile payloads --------------------------------------------------------------------------


def test_bomb_fails_fast_and_bounded() -> None:
    c = zlib.compressobj(1)
    bomb = c.compress(bytes(64 << 20)) + c.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 512 << 10  # 64 MiB in ~290 KiB
    recv = ZlibRecv()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(DecompressionError, match="more than"):
            receive_payload(recv, bomb, 1)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    # one page of output, the inflate state, and the copy of the unread input zlib keeps as
    # unconsumed_tail: nothing near the 64 MiB the payload would inflate to
    assert peak < len(bomb) + (128 << 10)


@pytest.mark.parametrize("cut", [1, 2, 4, 5, 100])
def test_truncated(cut: int) -> None:
    send, recv = pair()
    pages = mixed_pages(8, 14)
    payload = prepare_payload(send, pages)
    with pytest.raises(DecompressionError):
        receive_payload(recv, payload[:-cut], 8)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00\xff", b"\x03\x00", bytes(range(40))])
def test_trailing_bytes(extra: bytes) -> None:
    send, recv = pair()
    pages = mixed_pages(8, 15)
    payload = prepare_payload(send, pages)
    with pytest.raises(DecompressionError):
        receive_payload(recv, payload + extra, 8)


def test_trailing_data_after_stream_end() -> None:
    c = zlib.compressobj(1)
    pages = mixed_pages(2, 16)
    ended = c.compress(b"".join(pages)) + c.flush(zlib.Z_FINISH) + b"\x00\x00\xff\xff"
    with pytest.raises(DecompressionError, match="final block"):
        receive_payload(ZlibRecv(), ended, 2)


def test_finished_stream_refused() -> None:
    c = zlib.compressobj(1)
    pages = mixed_pages(2, 17)
    ended = c.compress(b"".join(pages)) + c.flush(zlib.Z_FINISH)
    with pytest.raises(DecompressionError):
        receive_payload(ZlibRecv(), ended, 2)


def test_corrupt() -> None:
    send, recv = pair()
    pages = mixed_pages(8, 18)
    first = prepare_payload(send, pages)
    with pytest.raises(DecompressionError, match="corrupt"):
        receive_payload(ZlibRecv(), b"\x79" + first[1:], 8)  # bad zlib header check
    assert receive_payload(recv, first, 8) == b"".join(pages)
    second = prepare_payload(send, pages)
    with pytest.raises(DecompressionError, match="corrupt"):
        receive_payload(recv, b"\xff" + second[1:], 8)  # reserved block type
    rng = random.Random(19)
    for _ in range(20):
        garbage = b"\x78\x01" + rng.randbytes(2000) + b"\x00\x00\xff\xff"
        with pytest.raises(DecompressionError):
            receive_payload(ZlibRecv(), garbage, 8)


def test_empty_payload() -> None:
    with pytest.raises(DecompressionError):
        receive_payload(ZlibRecv(), b"", 1)
