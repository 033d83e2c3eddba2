"""Conformance kit for compression plugins.

A plugin's own tests subclass :class:`MethodConformance` and say how to make their method::

    from multifd_core.testing import MethodConformance

    class TestMyMethod(MethodConformance):
        def make_method(self):
            return MyMethod(level=3)

pytest then runs every ``test_*`` below against it: round trips of whole migrations through real
channels (TCP loopback and memory streams) over several rounds, per-channel state independence,
payload size bounds (a full packet of incompressible pages included), bounded decompression (a
payload that inflates past the packet's pages), truncated, corrupt and over-long payloads,
packets with another method's flags, and, for a ``threaded`` method, calls that release the GIL
(:mod:`~multifd_core.testing.gil`). The tests are plain synchronous functions (each runs its own
``trio.run``), so no pytest plugin is needed. Each failure is an ``AssertionError`` whose message
says what was wrong and where (block, page and offset of the first differing byte: see
:mod:`~multifd_core.testing.compare`), since pytest does not rewrite the asserts of an installed
package.
Nothing here knows any particular method. :mod:`multifd_core.testing.plugin_checks` has the
checks of an installed plugin (registration, stream history, the engine by name).
"""

from __future__ import annotations

import os
import random
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import trio

from .. import MultiFDMethod, RAMBlock, RecvContext, SendContext
from ..errors import CompressionMismatch, DecompressionError, IntegrityError, MultiFDError
from ..image import vm_like_image
from ..nocomp import NocompRecv, NocompSend
from ..stats import MigrationStats
from .compare import check, check_same
from .gil import check_releases_gil
from .harness import run_loopback
from .pages import PAGE, Guarded, dirty_blocks, join, prepare, sample_pages

#: The pages of a full packet (QEMU's MULTIFD_PACKET_SIZE of 4 KiB pages): the most a payload
#: carries.
FULL_PACKET = 128


def identity_method(name: str, value: int) -> type[MultiFDMethod]:
    """A method class ``name`` on compression ``value`` whose payloads are the pages as they
    are (nocomp's contexts): a stand-in to send packets with another method's flags."""

    def send_setup(self: MultiFDMethod, channel: int) -> SendContext:
        return NocompSend()

    def recv_setup(self: MultiFDMethod, channel: int) -> RecvContext:
        return NocompRecv()

    namespace = {"name": name, "value": value, "threaded": False}
    namespace |= {"send_setup": send_setup, "recv_setup": recv_setup}
    return type(f"Identity_{name}", (MultiFDMethod,), namespace)


def _other_method(value: int) -> MultiFDMethod:
    return identity_method("conformance-other", 7 if value != 7 else 6)()


def check_decoded(out: Guarded, pages: list[bytes], what: str) -> None:
    """``out`` holds exactly ``pages`` and nothing was written around them, else
    ``AssertionError`` saying ``what`` and where."""
    check_same(b"".join(pages), out.contents(), f"{what}: the pages decoded wrong")
    outside = out.outside_writes()
    check(outside is None, f"{what}: the receiver wrote outside its pages, at {outside}")


def check_bound(method: MultiFDMethod, payload: bytes, npages: int, what: str) -> None:
    """``payload``, for ``npages`` pages, is within ``method.payload_size``."""
    raw = npages * PAGE
    low, high = method.payload_size(raw)
    check(
        low <= len(payload) <= high,
        f"{method.name}: {what}: a payload of {len(payload)} bytes for {npages} pages ({raw} "
        f"bytes), outside payload_size({raw}) = ({low}, {high})"
        + (
            ": the payload_size bound is too small (the sender fails such a packet with "
            "MethodError before it goes, a receiver would refuse it with BadPacketSize); "
            "return the compressor's worst case"
            if len(payload) > high
            else ""
        ),
    )


async def migrate_pair(
    src_method: MultiFDMethod,
    dst_method: MultiFDMethod,
    *,
    channels: int = 2,
    size: int = 3 << 20,
    rounds: int = 3,
    tcp: bool = True,
    seed: int = 1,
    integrity: bool = True,
) -> tuple[bytes, bytes]:
    """Migrate a VM-like image, changing pages between rounds; return (source, destination).

    Raises the destination's error (else the source's) when the migration fails. With
    ``integrity`` (the default, as users run it) the packets carry checksums, and a method that
    writes pages wrong fails there with IntegrityError; without, the caller compares the images
    itself (and can name the page and offset)."""
    block = RAMBlock("pc.ram", vm_like_image(size, PAGE, seed))
    rng = random.Random(seed)
    run = await run_loopback(
        [block],
        transport="tcp" if tcp else "memory",
        rounds=rounds,
        between_rounds=lambda r, _: dirty_blocks([block], 64, rng, r),
        source={"channels": channels, "method": src_method, "integrity": integrity},
        destination={"channels": channels, "method": dst_method},
        timeout=120,
    )
    return bytes(block.memory), run.dst_blocks["pc.ram"].host.tobytes()


async def migrate_by_name(
    method: str,
    method_options: Mapping[str, Any] | None = None,
    *,
    channels: int = 2,
    size: int = 4 << 20,
    seed: int = 5,
) -> tuple[bytes, bytes, MigrationStats, MigrationStats]:
    """Migrate a VM-like image in two rounds over in-memory channels, the method picked by
    name from the registry on both sides (``method_options`` go to the source), 300 pages
    (drawn from ``random.Random(channels)``) changed between the rounds.

    Returns (source image, destination image, source stats, destination stats).
    """
    rng = random.Random(channels)
    block = RAMBlock("pc.ram", vm_like_image(size, PAGE, seed), PAGE)
    run = await run_loopback(
        [block],
        rounds=2,
        between_rounds=lambda r, _: dirty_blocks([block], 300, rng, r),
        source={"channels": channels, "method": method, "method_options": method_options},
        destination={"channels": channels, "method": method},
    )
    src_stats, dst_stats = run.src_stats, run.dst_stats
    if src_stats is None or dst_stats is None:
        raise AssertionError("a migration ended without the stats of both ends")
    image = run.dst_blocks["pc.ram"].host.tobytes()
    return bytes(block.memory), image, src_stats, dst_stats


class MethodConformance:
    """Subclass as ``Test...`` and implement :meth:`make_method`."""

    def make_method(self) -> MultiFDMethod:
        raise NotImplementedError

    # --- whole migrations -------------------------------------------------------------------

    def test_migration_round_trip_tcp(self) -> None:
        try:
            src, dst = trio.run(
                lambda: migrate_pair(self.make_method(), self.make_method(), channels=2)
            )
        except IntegrityError as exc:
            raise AssertionError(
                f"the method wrote pages that differ from those sent: {exc}"
            ) from exc
        check_same(src, dst, "the destination differs from the source", block="pc.ram")

    def test_migration_round_trip_memory_streams_many_channels(self) -> None:
        # without packet checksums, so that a page decoded wrong is named with its offset here
        # (the TCP round trip runs with them, as users do)
        src, dst = trio.run(
            lambda: migrate_pair(
                self.make_method(),
                self.make_method(),
                channels=5,
                tcp=False,
                rounds=4,
                seed=3,
                integrity=False,
            )
        )
        check_same(src, dst, "the destination differs from the source", block="pc.ram")

    def test_packets_with_other_flags_are_refused(self) -> None:
        method = self.make_method()

        async def run() -> None:
            await migrate_pair(_other_method(method.value), method, size=1 << 20, rounds=1)

        try:
            trio.run(run)
        except CompressionMismatch as exc:
            check(f"negotiated {method.value}" in str(exc), f"{exc} does not name the value")
        except MultiFDError as exc:  # pragma: no cover - reported as a failure below
            raise AssertionError(f"expected CompressionMismatch, got {exc!r}") from exc
        else:
            raise AssertionError("a packet with another method's flags was accepted")

    # --- contexts -------------------------------------------------------------------------

    def test_many_packets_through_one_channel(self) -> None:
        method = self.make_method()
        tx, rx = method.send_setup(0), method.recv_setup(0)
        try:
            for n, seed in ((1, 1), (128, 2), (7, 3), (128, 4), (64, 5), (3, 6)):
                pages = sample_pages(n, seed)
                payload = prepare(tx, pages)
                check_bound(method, payload, n, f"packet of seed {seed}")
                out = Guarded(n)
                rx.recv_pages(memoryview(payload), out.pages)
                check_decoded(out, pages, f"packet of {n} pages (seed {seed})")
        finally:
            tx.send_cleanup()
            rx.recv_cleanup()

    def test_channel_states_are_independent(self) -> None:
        method = self.make_method()
        txs = [method.send_setup(i) for i in range(3)]
        rxs = [method.recv_setup(i) for i in range(3)]
        try:
            for step in range(12):
                ch = (step * 5) % 3  # interleave the channels unevenly
                pages = sample_pages(1 + step * 9 % 40, 100 + step)
                payload = prepare(txs[ch], pages)
                out = Guarded(len(pages))
                rxs[ch].recv_pages(memoryview(payload), out.pages)
                check_decoded(out, pages, f"step {step}, channel {ch}")
        finally:
            for tx in txs:
                tx.send_cleanup()
            for rx in rxs:
                rx.recv_cleanup()

    def test_pages_given_as_runs(self) -> None:
        """Contiguous pages may come as one view of several pages, on both sides."""
        method = self.make_method()
        tx, rx = method.send_setup(0), method.recv_setup(0)
        pages = sample_pages(12, 9)
        blob = b"".join(pages)
        view = memoryview(blob)
        runs = [view[0 : 5 * PAGE], view[5 * PAGE : 6 * PAGE], view[6 * PAGE :]]
        payload = join(tx.send_prepare(runs))
        out = Guarded(12)
        whole = memoryview(out.buf)[Guarded.GUARD : Guarded.GUARD + 12 * PAGE]
        rx.recv_pages(memoryview(payload), [whole[: 3 * PAGE], whole[3 * PAGE :]])
        check_decoded(out, [blob], "pages given as runs")

    def test_full_packet_of_incompressible_pages_fits_its_bound(self) -> None:
        """A full packet of random pages (os.urandom: what no compressor shrinks) and a single
        one: each payload within ``payload_size``, each decoded back."""
        method = self.make_method()
        tx, rx = method.send_setup(0), method.recv_setup(0)
        try:
            for n in (FULL_PACKET, 1):
                pages = [os.urandom(PAGE) for _ in range(n)]
                payload = prepare(tx, pages)
                check_bound(method, payload, n, f"{n} incompressible pages")
                out = Guarded(n)
                rx.recv_pages(memoryview(payload), out.pages)
                check_decoded(out, pages, f"{n} incompressible pages")
        finally:
            tx.send_cleanup()
            rx.recv_cleanup()

    def test_threaded_calls_release_the_gil(self) -> None:
        """``threaded = True`` promises calls that release the GIL: see
        :mod:`multifd_core.testing.gil` for how it is measured."""
        method = self.make_method()
        if not method.threaded or method.raw_payload:
            import pytest  # only a test runner gets here

            why = "its payload is its pages" if method.raw_payload else "threaded = False"
            pytest.skip(f"{method.name} runs no codec in worker threads ({why})")
        check_releases_gil(method)

    # --- hostile payloads ----------------------------------------------------------------

    def _expect_refused(self, payload: bytes, npages: int, rx: RecvContext | None = None) -> None:
        rx = rx or self.make_method().recv_setup(0)
        out = Guarded(npages)
        try:
            rx.recv_pages(memoryview(payload), out.pages)
        except DecompressionError:
            pass
        else:
            raise AssertionError(
                f"a bad payload of {len(payload)} bytes for {npages} pages was accepted"
            )
        finally:
            rx.recv_cleanup()
        outside = out.outside_writes()
        check(outside is None, f"the receiver wrote outside its pages, at {outside}")

    def test_payload_longer_than_declared_pages(self) -> None:
        """A payload holding 16 pages, declared as 2: refused, nothing written outside."""
        method = self.make_method()
        payload = prepare(method.send_setup(0), sample_pages(16, 11))
        self._expect_refused(payload, 2)

    def test_decompression_bomb_is_bounded(self) -> None:
        """8 MiB of zero pages in one payload, declared as one page: refused quickly with
        memory bounded by a small multiple of the declared size."""
        method = self.make_method()
        zero = bytes(PAGE)
        payload = prepare(method.send_setup(0), [zero] * 2048)
        tracemalloc.start()
        try:
            self._expect_refused(payload, 1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        limit = len(payload) + 4 * (1 << 20)
        check(peak < limit, f"decoding a bomb took {peak} bytes of memory at its peak (> {limit})")

    def test_truncated_payloads(self) -> None:
        method = self.make_method()
        pages = sample_pages(20, 12)
        payload = prepare(method.send_setup(0), pages)
        for cut in sorted({1, len(payload) // 2, len(payload) - 1}):
            self._expect_refused(payload[:cut], len(pages))

    def test_trailing_bytes_are_refused(self) -> None:
        method = self.make_method()
        pages = sample_pages(20, 13)
        payload = prepare(method.send_setup(0), pages)
        self._expect_refused(payload + b"\x00\x01trailing", len(pages))

    def test_fewer_pages_than_payload_is_refused(self) -> None:
        method = self.make_method()
        pages = sample_pages(20, 14)
        payload = prepare(method.send_setup(0), pages)
        self._expect_refused(payload, len(pages) + 1)

    def test_corrupt_payloads_fail_cleanly(self) -> None:
        """Flipped bytes give DecompressionError or (a method without checksums) some pages
        filled exactly; never another exception, never a write outside the pages."""
        method = self.make_method()
        pages = sample_pages(24, 15)
        payload = bytearray(prepare(method.send_setup(0), pages))
        rng = random.Random(5)
        for _ in range(40):
            bad = bytearray(payload)
            for _ in range(rng.randint(1, 8)):
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            out = Guarded(len(pages))
            rx = method.recv_setup(0)
            try:
                rx.recv_pages(memoryview(bytes(bad)), out.pages)
            except DecompressionError:
                pass
            finally:
                rx.recv_cleanup()
            outside = out.outside_writes()
            check(outside is None, f"a corrupt payload was written outside its pages, at {outside}")

    def test_empty_payload_is_refused(self) -> None:
        self._expect_refused(b"", 1)


def conformance_classes(
    factory: Callable[..., MultiFDMethod], *option_sets: Mapping[str, Any]
) -> list[type[MethodConformance]]:
    """One :class:`MethodConformance` class for each of ``option_sets``, its method made by
    ``factory(**options)``; bind them to ``Test...`` names of a test module::

        TestZlibConformance, TestZlibConformanceLevel3 = conformance_classes(
            ZlibMethod, {}, {"level": "3"}
        )
    """

    def case(options: Mapping[str, Any]) -> type[MethodConformance]:
        def make_method(self: MethodConformance) -> MultiFDMethod:
            return factory(**options)

        name = f"{getattr(factory, '__name__', 'Method')}Conformance"
        return type(name, (MethodConformance,), {"make_method": make_method})

    return [case(options) for options in option_sets]
