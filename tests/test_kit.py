"""The conformance kit's own checks can fail: each is run against a method broken the way an
author's could be, and must raise an AssertionError saying what and where. A sound codec of the
standard library passes the whole kit (the GIL check included), so none of them fails always."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import pytest

from multifd_core import MultiFDMethod, RecvContext, SendContext
from multifd_core.errors import DecompressionError
from multifd_core.testing import (
    MethodConformance,
    check_releases_gil,
    check_same,
    conformance_classes,
    difference,
    heartbeat_share,
)
from multifd_core.testing.gil import MIN_SHARE
from multifd_core.testing.pages import PAGE, Guarded


class PacketZlibSend(SendContext):
    def send_prepare(self, pages: Sequence[memoryview]) -> list[bytes]:
        c = zlib.compressobj(1)
        return [*(out for page in pages if (out := c.compress(page))), c.flush()]


class PacketZlibRecv(RecvContext):
    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        expected = sum(len(p) for p in pages)
        d = zlib.decompressobj()
        try:
            out = d.decompress(payload, expected + 1)
        except zlib.error as exc:
            raise DecompressionError(f"corrupt: {exc}") from None
        if len(out) != expected or not d.eof or d.unused_data:
            raise DecompressionError(f"{len(out)} bytes, eof {d.eof}, pages need {expected}")
        pos = 0
        for page in pages:
            page[:] = out[pos : pos + len(page)]
            pos += len(page)


class PacketZlib(MultiFDMethod):
    """A sound method: one zlib stream per packet (zlib releases the GIL)."""

    name, value = "packet-zlib", 5

    def send_setup(self, channel: int) -> SendContext:
        return PacketZlibSend()

    def recv_setup(self, channel: int) -> RecvContext:
        return PacketZlibRecv()


class TestSoundMethodPassesTheKit(MethodConformance):
    def make_method(self) -> PacketZlib:
        return PacketZlib()


def kit(method: type[MultiFDMethod]) -> MethodConformance:
    """The kit's tests bound to ``method``, to call one by one."""
    return conformance_classes(method, {})[0]()


# --- payload_size -------------------------------------------------------------------------


class RawLenBound(PacketZlib):
    """Believes a compressed packet is never larger than its pages."""

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        return 1, raw_len


def test_a_bound_too_small_for_incompressible_pages_is_named() -> None:
    checks = kit(RawLenBound)
    checks.test_many_packets_through_one_channel()  # VM-like pages fit: only the new check sees it
    with pytest.raises(AssertionError) as failed:
        checks.test_full_packet_of_incompressible_pages_fits_its_bound()
    msg = str(failed.value)
    assert msg.startswith("packet-zlib: 128 incompressible pages: a payload of ")
    assert "for 128 pages (524288 bytes), outside payload_size(524288) = (1, 524288)" in msg
    assert "the payload_size bound is too small" in msg and "BadPacketSize" in msg


# --- wrong pages --------------------------------------------------------------------------


class FlippingRecv(PacketZlibRecv):
    """Decodes right, then flips bit 0 of byte 100 of the packet's fourth page."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        super().recv_pages(payload, pages)
        at = 3 * PAGE + 100
        for page in pages:
            if at < len(page):
                page[at] ^= 1
                return
            at -= len(page)


class Flipping(PacketZlib):
    def recv_setup(self, channel: int) -> RecvContext:
        return FlippingRecv()


def test_a_flipped_byte_is_named_by_page_and_offset() -> None:
    with pytest.raises(AssertionError) as failed:
        kit(Flipping).test_many_packets_through_one_channel()
    msg = str(failed.value)
    assert msg.startswith("packet of 128 pages (seed 2): the pages decoded wrong: ")
    assert "page 3, offset 12388 (byte 100 of the page) differs first: expected 0x" in msg
    assert msg.endswith("; 1 of 128 pages differ")


def test_a_flipped_byte_in_a_tcp_migration_fails_its_checksums() -> None:
    """The TCP round trip runs with packet checksums, as users do: the flip is caught there."""
    with pytest.raises(AssertionError, match="wrote pages that differ from those sent") as failed:
        kit(Flipping).test_migration_round_trip_tcp()
    assert "IntegrityError" in repr(failed.value.__cause__) and "'pc.ram'" in str(failed.value)


def test_a_flipped_byte_in_a_migration_is_named_by_block_page_and_offset() -> None:
    with pytest.raises(AssertionError) as failed:
        kit(Flipping).test_migration_round_trip_memory_streams_many_channels()
    msg = str(failed.value)
    assert msg.startswith("the destination differs from the source: block 'pc.ram', page ")
    assert "(byte 100 of the page) differs first" in msg


class PastTheEnd(PacketZlibRecv):
    """Decodes right, then writes one byte past the last page (a C codec's overflow)."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        super().recv_pages(payload, pages)
        whole = memoryview(pages[-1].obj)  # type: ignore[arg-type]
        end = whole.nbytes - Guarded.GUARD
        whole[end] = 0


class Overflowing(PacketZlib):
    def recv_setup(self, channel: int) -> RecvContext:
        return PastTheEnd()


def test_a_write_past_the_pages_is_named() -> None:
    with pytest.raises(AssertionError) as failed:
        kit(Overflowing).test_many_packets_through_one_channel()
    assert str(failed.value) == (
        "packet of 1 pages (seed 1): the receiver wrote outside its pages, at offset 4096 "
        "(past the last page's end, 4096)"
    )


class TrustingRecv(RecvContext):
    """Copies whatever the payload holds, checking nothing (a raw codec's mistake)."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        out = zlib.decompressobj().decompress(payload, sum(len(p) for p in pages))
        pos = 0
        for page in pages:
            page[: len(out[pos : pos + len(page)])] = out[pos : pos + len(page)]
            pos += len(page)


class Trusting(PacketZlib):
    def recv_setup(self, channel: int) -> RecvContext:
        return TrustingRecv()


def test_an_accepted_bad_payload_is_named() -> None:
    with pytest.raises(AssertionError, match=r"^a bad payload of \d+ bytes for 20 pages was acc"):
        kit(Trusting).test_trailing_bytes_are_refused()


# --- the GIL ------------------------------------------------------------------------------


class HexSend(SendContext):
    def send_prepare(self, pages: Sequence[memoryview]) -> list[bytes]:
        return [b"".join(pages).hex().encode()]  # C code that keeps the GIL


class HexRecv(RecvContext):
    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        out = bytes.fromhex(bytes(payload).decode())
        pos = 0
        for page in pages:
            page[:] = out[pos : pos + len(page)]
            pos += len(page)


class HexHoldingTheGil(MultiFDMethod):
    name, value, threaded = "hex", 6, True

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        return 2 * raw_len, 2 * raw_len

    def send_setup(self, channel: int) -> SendContext:
        return HexSend()

    def recv_setup(self, channel: int) -> RecvContext:
        return HexRecv()


class XorSend(SendContext):
    def send_prepare(self, pages: Sequence[memoryview]) -> list[bytes]:
        return [bytes(b ^ 0x5A for b in b"".join(pages))]  # Python, byte by byte


class XorRecv(RecvContext):
    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        out = bytes(b ^ 0x5A for b in payload)
        pos = 0
        for page in pages:
            page[:] = out[pos : pos + len(page)]
            pos += len(page)


class PurePythonXor(HexHoldingTheGil):
    name = "xor"

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        return raw_len, raw_len

    def send_setup(self, channel: int) -> SendContext:
        return XorSend()

    def recv_setup(self, channel: int) -> RecvContext:
        return XorRecv()


@pytest.mark.parametrize("method", [HexHoldingTheGil, PurePythonXor])
def test_a_threaded_method_holding_the_gil_fails(method: type[MultiFDMethod]) -> None:
    with pytest.raises(AssertionError) as failed:
        kit(method).test_threaded_calls_release_the_gil()
    msg = str(failed.value)
    assert msg.startswith(f"{method.name} is threaded but its send_prepare holds the GIL: ")
    assert "or set threaded = False" in msg


def test_the_gil_check_measures_the_share_of_heartbeats() -> None:
    shares = check_releases_gil(PacketZlib(), npages=32)
    assert set(shares) == {"send_prepare", "recv_pages"}
    assert all(share >= MIN_SHARE for share in shares.values()), shares
    assert heartbeat_share(lambda: sum(range(100_000))) < MIN_SHARE  # C code keeping the GIL


def test_the_gil_check_passes_on_the_errors_of_the_work() -> None:
    def broken() -> None:
        raise DecompressionError("raised in the worker")

    with pytest.raises(DecompressionError, match="raised in the worker"):
        heartbeat_share(broken)


# --- the verdicts -------------------------------------------------------------------------


def test_difference_says_where_and_how_much() -> None:
    a = bytes(3 * PAGE)
    assert difference(a, a) is None
    b = bytearray(a)
    b[PAGE + 7] = 0xFF
    b[2 * PAGE] = 1
    assert difference(a, b, block="pc.ram") == (
        "block 'pc.ram', page 1, offset 4103 (byte 7 of the page) differs first: "
        "expected 0x00, got 0xff; 2 of 3 pages differ"
    )
    assert difference(a, a[:-1]) == "12287 bytes where 12288 were expected (equal up to there)"
    check_same(a, bytearray(a), "equal pages")  # no raise
    with pytest.raises(AssertionError, match=r"^the pages: page 2, offset 8192 \(byte 0 of "):
        check_same(a, bytes(2 * PAGE) + b"\x01" + bytes(PAGE - 1), "the pages")
