"""Tests of the lz4 method: one independent LZ4 block per packet, decoded with exact bounds."""

from __future__ import annotations

import random
import time
import tracemalloc

import lz4.block
import pytest
from multifd_lz4 import Lz4Method, Lz4Recv, Lz4Send, compress_bound

import multifd_core
from multifd_core.errors import ConfigError, DecompressionError

PAGE = 4096
TEXT = b"".join(b"line %5d: the quick brown fox jumps over the lazy dog\n" % i for i in range(200))


def vm_pages(n: int, seed: int) -> list[bytes]:
    """A VM-like mix: zero, random, text, repeated and half-filled pages."""
    rng = random.Random(seed)
    pages: list[bytes] = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            page = bytes(PAGE)
        elif kind == 1:
            page = rng.randbytes(PAGE)
        elif kind == 2:
            at = rng.randrange(len(TEXT) - PAGE)
            page = TEXT[at : at + PAGE]
        elif kind == 3 and pages:
            page = rng.choice(pages)
        elif kind == 4:
            page = rng.randbytes(PAGE // 2) + bytes(PAGE // 2)
        else:
            page = bytes([rng.randrange(256)]) * 64 + rng.randbytes(64) * 63
        pages.append(page)
    return pages


def views(buf: bytearray, runs: list[int]) -> list[memoryview]:
    """Views of ``buf`` split into runs of the given page counts (the engine sends runs)."""
    mv = memoryview(buf)
    out, at = [], 0
    for count in runs:
        out.append(mv[at : at + count * PAGE])
        at += count * PAGE
    assert at == len(buf)
    return out


def split_runs(npages: int, rng: random.Random) -> list[int]:
    runs = []
    while npages:
        n = rng.randint(1, min(npages, 8))
        runs.append(n)
        npages -= n
    return runs


def packet(send: Lz4Send, pages: list[bytes], runs: list[int] | None = None) -> bytes:
    src = bytearray(b"".join(pages))
    return b"".join(send.send_prepare(views(src, runs or [1] * len(pages))))


def receive(recv: Lz4Recv, payload: bytes, npages: int, runs: list[int] | None = None) -> bytes:
    dst = bytearray(npages * PAGE)
    recv.recv_pages(memoryview(payload), views(dst, runs or [1] * npages))
    return bytes(dst)


def pair(**options: object) -> tuple[Lz4Send, Lz4Recv]:
    method = Lz4Method(**options)
    send, recv = method.send_setup(0), method.recv_setup(0)
    assert isinstance(send, Lz4Send) and isinstance(recv, Lz4Recv)
    return send, recv


# --- registration and options ---------------------------------------------------------------


def test_registered_through_entry_point() -> None:
    registry = multifd_core.load_methods()
    info = registry.get("lz4")
    assert info.value == 3 and info.cls is Lz4Method
    assert info.distribution.startswith("multifd-lz4 ")
    assert registry.get(3) is info
    assert Lz4Method.threaded and not Lz4Method.raw_payload
    assert Lz4Method().flags == 0x6


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
        assert len(packet(send, [rng.randbytes(PAGE) for _ in range(n)])) <= compress_bound(
            n * PAGE
        )


# --- the format -----------------------------------------------------------------------------


def test_payload_is_one_plain_lz4_block() -> None:
    pages = vm_pages(128, 2)
    send, _ = pair()
    payload = packet(send, pages, split_runs(128, random.Random(2)))
    data = b"".join(pages)
    assert payload == lz4.block.compress(data, store_size=False)
    assert lz4.block.decompress(payload, uncompressed_size=len(data)) == data
    fast, _ = pair(acceleration=8)
    assert packet(fast, pages) == lz4.block.compress(
        data, store_size=False, mode="fast", acceleration=8
    )


@pytest.mark.parametrize(
    "options", [{}, {"acceleration": 8}, {"acceleration": 65537}, {"level": 1}, {"level": 12}]
)
def test_round_trip_many_packets(options: dict[str, object]) -> None:
    send, recv = pair(**options)
    rng = random.Random(5)
    for i in range(40):
        n = rng.choice([1, 2, 7, 64, 128])
        pages = vm_pages(n, 100 + i)
        payload = packet(send, pages, split_runs(n, rng))
        assert receive(recv, payload, n, split_runs(n, rng)) == b"".join(pages)


def test_zero_random_text_pages() -> None:
    send, recv = pair()
    rng = random.Random(7)
    for pages in (
        [bytes(PAGE)] * 128,
        [rng.randbytes(PAGE) for _ in range(128)],
        [TEXT[i * 10 : i * 10 + PAGE] for i in range(128)],
    ):
        payload = packet(send, pages)
        assert receive(recv, payload, len(pages)) == b"".join(pages)
    assert len(packet(send, [bytes(PAGE)] * 128)) < 4096


def test_two_channels_interleaved_and_packets_independent() -> None:
    method = Lz4Method()
    sends = [method.send_setup(0), method.send_setup(1)]
    recvs = [method.recv_setup(0), method.recv_setup(1)]
    payloads = []
    for i in range(20):
        for ch in (0, 1):
            pages = vm_pages(16, 1000 * ch + i)
            payload = packet(sends[ch], pages)  # type: ignore[arg-type]
            payloads.append((payload, pages))
            assert receive(recvs[ch], payload, 16) == b"".join(pages)  # type: ignore[arg-type]
    # no history: any context decodes any packet, in any order
    for payload, pages in reversed(payloads):
        assert receive(Lz4Recv(), payload, 16) == b"".join(pages)


# --- hostile payloads --------------------------------------------------------------------------


def test_bomb_fails_fast_and_bounded() -> None:
    bomb = lz4.block.compress(bytes(64 << 20), store_size=False)
    assert len(bomb) < 512 << 10
    recv = Lz4Recv()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(DecompressionError, match="lz4 payload of"):
            receive(recv, bomb, 1)  # over the size bound for one page
        with pytest.raises(DecompressionError, match="corrupt"):
            receive(recv, bomb[:4000], 1)  # within it: decoding stops at the page's end
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 64 << 10


def test_more_output_than_pages() -> None:
    send, recv = pair()
    with pytest.raises(DecompressionError, match="corrupt"):
        receive(recv, packet(send, vm_pages(3, 12)), 2)


def test_less_output_than_pages() -> None:
    send, recv = pair()
    with pytest.raises(DecompressionError, match="to 12288 bytes"):
        receive(recv, packet(send, vm_pages(3, 13)), 4)


@pytest.mark.parametrize("cut", [1, 2, 5, 100])
def test_truncated(cut: int) -> None:
    send, recv = pair()
    payload = packet(send, vm_pages(8, 14))
    with pytest.raises(DecompressionError):
        receive(recv, payload[:-cut], 8)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00", b"\x10\x00", bytes(range(40))])
def test_trailing_bytes(extra: bytes) -> None:
    send, recv = pair()
    payload = packet(send, vm_pages(8, 15))
    with pytest.raises(DecompressionError):
        receive(recv, payload + extra, 8)


def test_corrupt() -> None:
    send, recv = pair()
    pages = vm_pages(8, 18)
    payload = bytearray(packet(send, pages))
    payload[0] &= 0x0F  # no literals first: the first match reaches before the block's start
    with pytest.raises(DecompressionError, match="corrupt"):
        receive(recv, bytes(payload), 8)
    # 4 literals, then a match at offset 255: reaching back before the start of the block
    with pytest.raises(DecompressionError, match="corrupt"):
        receive(recv, b"\x40abcd\xff\x00" + b"\x50" + b"x" * 5, 1)
    rng = random.Random(19)
    for _ in range(50):
        with pytest.raises(DecompressionError):
            receive(recv, rng.randbytes(rng.randrange(1, 3000)), 8)
    with pytest.raises(DecompressionError, match="lz4 payload of 0 bytes"):
        receive(recv, b"", 1)


# --- through the engine -----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_migration_through_the_engine(channels: int) -> None:
    """Two rounds over in-memory channels, the method picked by name from the registry."""
    migration = pytest.importorskip("multifd_core.migration")
    image = pytest.importorskip("multifd_core.image")
    import trio

    rng = random.Random(channels)
    block = multifd_core.RAMBlock("pc.ram", image.vm_like_image(4 << 20, PAGE, 5), PAGE)
    net = multifd_core.MemoryNetwork()
    result: dict[str, object] = {}

    async def run() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def destination() -> None:
                    async with migration.open_destination(
                        net.accept, channels=channels, method="lz4"
                    ) as dst:
                        result["stats"] = await dst.wait()
                    result["blocks"] = dst.blocks

                nursery.start_soon(destination)
                async with migration.open_source(
                    [block],
                    net.connect,
                    channels=channels,
                    method="lz4",
                    method_options={"acceleration": "2"},
                ) as src:
                    await src.send_round()
                    for off in image.dirty_some_pages(block.memory, PAGE, 300, rng, 1):
                        block.mark_dirty(off)
                    result["src"] = await src.complete()

    trio.run(run)
    received = result["blocks"]["pc.ram"]  # type: ignore[index]
    assert received.host.tobytes() == bytes(block.memory)
    src, dst = result["src"], result["stats"]
    assert src.normal_pages == dst.normal_pages > 0  # type: ignore[attr-defined]
    assert dst.payload_bytes < dst.normal_pages * PAGE  # type: ignore[attr-defined]
