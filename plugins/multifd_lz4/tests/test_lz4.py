"""Tests of the lz4 method: one independent LZ4 block per packet, decoded with exact bounds."""

from __future__ import annotations

import random
import time
import tracemalloc
from typing import ClassVar

import lz4.block
import pytest
from multifd_lz4 import Lz4Method, Lz4Recv, Lz4Send, compress_bound

from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.testing import (
    PluginChecks,
    conformance_classes,
    context_pair,
    interleave_two_channels,
    round_trips,
)
from multifd_core.testing.pages import (
    PAGE,
    mixed_pages,
    prepare_payload,
    random_runs,
    receive_payload,
)


def pair(**options: object) -> tuple[Lz4Send, Lz4Recv]:
    return context_pair(Lz4Method(**options), Lz4Send, Lz4Recv)


# --- the kit: multifd_core's conformance kit and the checks every plugin shares -----------------


TestLz4Conformance, TestLz4ConformanceOtherLevel = conformance_classes(
    Lz4Method, {}, {"acceleration": "8"}
)


class TestLz4Plugin(PluginChecks):
    """Registration, zero/random/text pages (128 zero pages under 4 KiB), two interleaved
    channels, the engine by name; a payload decoding past its pages is corrupt."""

    name, value, distribution = "lz4", 3, "multifd-lz4"
    engine_options: ClassVar = {"acceleration": "2"}
    more_output_match = "corrupt"

    def make_method(self, **options: object) -> Lz4Method:
        return Lz4Method(**options)

    def test_two_channels_interleaved(self) -> None:
        """Two channels interleaved, and the packets independent."""
        payloads = interleave_two_channels(Lz4Method())
        # no history: any context decodes any packet, in any order
        for payload, pages in reversed(payloads):
            assert receive_payload(Lz4Recv(), payload, 16) == b"".join(pages)


# --- options ----------------------------------------------------------------------------------


def test_options() -> None:
    assert Lz4Method().options == {"acceleration": 1, "level": 0}
    assert Lz4Method(acceleration="8").acceleration == 8
    assert Lz4Method(level="9").level == 9
    for bad in (
        {"acceleration": 0},
        {"acceleration": "fast"},
        {"level": 13},
        {"level": -1},
        {"level": 9, "acceleration": 4},
        {"mode": "fast"},
        {"acceleration": True},
    ):
        with pytest.raises(ConfigError):
            Lz4Method(**bad)


def test_payload_size_bounds_real_payloads() -> None:
    low, high = Lz4Method().payload_size(128 * PAGE)
    assert (low, high) == (1, 128 * PAGE + 128 * PAGE // 255 + 16)
    send, _ = pair()
    rng = random.Random(1)
    for n in (1, 128):
        assert len(
            prepare_payload(send, [rng.randbytes(PAGE) for _ in range(n)])
        ) <= compress_bound(n * PAGE)


# --- the format -----------------------------------------------------------------------------


def test_payload_is_one_plain_lz4_block() -> None:
    pages = mixed_pages(128, 2)
    send, _ = pair()
    payload = prepare_payload(send, pages, random_runs(128, random.Random(2)))
    data = b"".join(pages)
    assert payload == lz4.block.compress(data, store_size=False)
    assert lz4.block.decompress(payload, uncompressed_size=len(data)) == data
    fast, _ = pair(acceleration=8)
    assert prepare_payload(fast, pages) == lz4.block.compress(
        data, store_size=False, mode="fast", acceleration=8
    )


@pytest.mark.parametrize(
    "options", [{}, {"acceleration": 8}, {"acceleration": 65537}, {"level": 1}, {"level": 12}]
)
def test_round_trip_many_packets(options: dict[str, object]) -> None:
    round_trips(*pair(**options), packets=40, history=False)


# --- hostile payloads --------------------------------------------------------------------------


def test_bomb_fails_fast_and_bounded() -> None:
    bomb = lz4.block.compress(bytes(64 << 20), store_size=False)
    assert len(bomb) < 512 << 10
    recv = Lz4Recv()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(DecompressionError, match="lz4 payload of"):
            receive_payload(recv, bomb, 1)  # over the size bound for one page
        with pytest.raises(DecompressionError, match="corrupt"):
            receive_payload(recv, bomb[:4000], 1)  # within it: decoding stops at the page's end
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 64 << 10


@pytest.mark.parametrize("cut", [1, 2, 5, 100])
def test_truncated(cut: int) -> None:
    send, recv = pair()
    payload = prepare_payload(send, mixed_pages(8, 14))
    with pytest.raises(DecompressionError):
        receive_payload(recv, payload[:-cut], 8)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00", b"\x10\x00", bytes(range(40))])
def test_trailing_bytes(extra: bytes) -> None:
    send, recv = pair()
    payload = prepare_payload(send, mixed_pages(8, 15))
    with pytest.raises(DecompressionError):
        receive_payload(recv, payload + extra, 8)


def test_corrupt() -> None:
    send, recv = pair()
    pages = mixed_pages(8, 18)
    payload = bytearray(prepare_payload(send, pages))
    payload[0] &= 0x0F  # no literals first: the first match reaches before the block's start
    with pytest.raises(DecompressionError, match="corrupt"):
        receive_payload(recv, bytes(payload), 8)
    # 4 literals, then a match at offset 255: reaching back before the start of the block
    with pytest.raises(DecompressionError, match="corrupt"):
        receive_payload(recv, b"\x40abcd\xff\x00" + b"\x50" + b"x" * 5, 1)
    rng = random.Random(19)
    for _ in range(50):
        with pytest.raises(DecompressionError):
            receive_payload(recv, rng.randbytes(rng.randrange(1, 3000)), 8)
    with pytest.raises(DecompressionError, match="lz4 payload of 0 bytes"):
        receive_payload(recv, b"", 1)
