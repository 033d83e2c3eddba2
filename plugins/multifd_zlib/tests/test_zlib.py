"""Tests of the zlib method: QEMU's bytes, stream history, and a receiver that trusts nothing."""

from __future__ import annotations

import random
import time
import tracemalloc
import zlib

import pytest
import trio
from multifd_zlib import ZlibMethod, ZlibRecv, ZlibSend

import multifd_core
from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.testing import (
    PAGE,
    TEXT,
    migrate_by_name,
    mixed_pages,
    prepare_payload,
    random_runs,
    receive_payload,
)


def pair() -> tuple[ZlibSend, ZlibRecv]:
    method = ZlibMethod()
    send, recv = method.send_setup(0), method.recv_setup(0)
    assert isinstance(send, ZlibSend) and isinstance(recv, ZlibRecv)
    return send, recv


# --- registration and options ---------------------------------------------------------------


def test_registered_through_entry_point() -> None:
    registry = multifd_core.load_methods()
    info = registry.get("zlib")
    assert info.value == 1 and info.cls is ZlibMethod
    assert info.distribution.startswith("multifd-zlib ")
    assert registry.get(1) is info
    assert ZlibMethod.threaded and not ZlibMethod.raw_payload
    assert ZlibMethod().flags == 0x2


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


# --- round trips --------------------------------------------------------------------------


def test_round_trip_many_packets_with_history() -> None:
    send, recv = pair()
    rng = random.Random(5)
    seen: list[bytes] = []
    for i in range(60):
        n = rng.choice([1, 2, 7, 64, 128])
        pages = mixed_pages(n, 100 + i)
        if seen and i % 3 == 0:  # pages sent before: history makes them nearly free
            pages[: min(n, 4)] = rng.sample(seen, min(n, 4, len(seen)))
        seen.extend(pages)
        runs = random_runs(n, rng)
        payload = prepare_payload(send, pages, runs)
        assert receive_payload(recv, payload, n, random_runs(n, rng)) == b"".join(pages)


def test_zero_random_text_pages() -> None:
    send, recv = pair()
    rng = random.Random(7)
    for pages in (
        [bytes(PAGE)] * 128,
        [rng.randbytes(PAGE) for _ in range(128)],
        [TEXT[i * 10 : i * 10 + PAGE] for i in range(128)],
    ):
        payload = prepare_payload(send, pages)
        assert receive_payload(recv, payload, len(pages)) == b"".join(pages)
    zero = prepare_payload(send, [bytes(PAGE)] * 128)
    assert len(zero) < 4096  # level 1 matches are at most 258 bytes: ~230:1


def test_two_channels_interleaved() -> None:
    method = ZlibMethod()
    sends = [method.send_setup(0), method.send_setup(1)]
    recvs = [method.recv_setup(0), method.recv_setup(1)]
    for i in range(20):
        for ch in (0, 1):
            pages = mixed_pages(16, 1000 * ch + i)
            payload = prepare_payload(sends[ch], pages)
            assert receive_payload(recvs[ch], payload, 16) == b"".join(pages)


def test_payload_needs_its_own_stream() -> None:
    send, recv = pair()
    pages = mixed_pages(32, 11)
    first = prepare_payload(send, pages)
    second = prepare_payload(send, pages)  # refers back to the first packet's bytes
    with pytest.raises(DecompressionError):
        receive_payload(ZlibRecv(), second, 32)
    assert receive_payload(recv, first, 32) == b"".join(pages)
    assert receive_payload(recv, second, 32) == b"".join(pages)


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


def test_more_output_than_pages() -> None:
    send, recv = pair()
    pages = mixed_pages(3, 12)
    with pytest.raises(DecompressionError, match="more than"):
        receive_payload(recv, prepare_payload(send, pages), 2)


def test_less_output_than_pages() -> None:
    send, recv = pair()
    pages = mixed_pages(3, 13)
    with pytest.raises(DecompressionError, match="inflates to 12288 bytes"):
        receive_payload(recv, prepare_payload(send, pages), 4)


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


def test_stream_stays_broken_after_error() -> None:
    send, recv = pair()
    pages = mixed_pages(4, 20)
    first = prepare_payload(send, pages)
    with pytest.raises(DecompressionError):
        receive_payload(recv, first[:-1], 4)
    with pytest.raises(DecompressionError, match="earlier error"):
        receive_payload(recv, first, 4)


def test_empty_payload() -> None:
    with pytest.raises(DecompressionError):
        receive_payload(ZlibRecv(), b"", 1)


# --- through the engine -----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_migration_through_the_engine(channels: int) -> None:
    """Two rounds over in-memory channels, the method picked by name from the registry."""
    sent, received, src, dst = trio.run(
        lambda: migrate_by_name("zlib", {"level": "6"}, channels=channels)
    )
    assert received == sent
    assert src.normal_pages == dst.normal_pages > 0
    assert dst.payload_bytes < dst.normal_pages * PAGE
