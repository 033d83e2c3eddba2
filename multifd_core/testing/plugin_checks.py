"""Checks of an installed compression plugin, shared by the plugins' own tests.

:class:`MethodConformance` holds what every method must do; this module holds what every
*installed* plugin is checked for beyond it, each check parametrized by a few class attributes
so that a plugin's test module keeps only what is specific to its format::

    class TestZlibPlugin(StreamChecks):
        name, value, distribution = "zlib", 1, "multifd-zlib"
        engine_options = {"level": "6"}
        zero_payload_limit = 4096

        def make_method(self, **options):
            return ZlibMethod(**options)

:class:`PluginChecks`: registration through the entry point, round trips of zero, random and
text pages, two interleaved channels, payloads decoding to more or fewer bytes than the packet's
pages, and whole migrations with the method picked by name from the registry (1 and 3
channels). :class:`StreamChecks`, for methods keeping one compression stream per channel: many
packets using the history, a payload that needs the stream before it, and a stream that stays
broken after an error.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import trio

from .. import MultiFDMethod, RecvContext, SendContext, load_methods
from ..errors import DecompressionError
from .compare import check, check_same
from .conformance import migrate_by_name
from .pages import PAGE, TEXT, mixed_pages, prepare_payload, random_runs, receive_payload

S = TypeVar("S", bound=SendContext)
R = TypeVar("R", bound=RecvContext)


def context_pair(method: MultiFDMethod, send_type: type[S], recv_type: type[R]) -> tuple[S, R]:
    """Channel 0's send and receive contexts of ``method``, checked to be of the given types."""
    send, recv = method.send_setup(0), method.recv_setup(0)
    if not (isinstance(send, send_type) and isinstance(recv, recv_type)):
        raise AssertionError(
            f"{method.name}'s contexts are {type(send).__name__} and {type(recv).__name__}, "
            f"expected {send_type.__name__} and {recv_type.__name__}"
        )
    return send, recv


def expect_refused(recv: RecvContext, payload: bytes, npages: int, match: str = "") -> None:
    """``payload`` decoded into ``npages`` pages must raise DecompressionError matching
    ``match`` (a regular expression searched in its message)."""
    try:
        receive_payload(recv, payload, npages)
    except DecompressionError as exc:
        check(re.search(match, str(exc)), f"the error {exc!s} does not match {match!r}")
    else:
        raise AssertionError(
            f"a bad payload of {len(payload)} bytes for {npages} pages was accepted"
        )


def round_trips(send: SendContext, recv: RecvContext, packets: int, history: bool) -> None:
    """``packets`` packets of 1 to 128 mixed pages, in random runs on both sides, through one
    pair of contexts (seeded: the same every time); with ``history``, every third packet
    repeats pages sent before (nearly free for a method keeping its stream)."""
    rng = random.Random(5)
    seen: list[bytes] = []
    for i in range(packets):
        n = rng.choice([1, 2, 7, 64, 128])
        pages = mixed_pages(n, 100 + i)
        if history:
            if seen and i % 3 == 0:
                pages[: min(n, 4)] = rng.sample(seen, min(n, 4, len(seen)))
            seen.extend(pages)
        payload = prepare_payload(send, pages, random_runs(n, rng))
        got = receive_payload(recv, payload, n, random_runs(n, rng))
        check_same(b"".join(pages), got, f"packet {i} of {n} pages decoded wrong")


def interleave_two_channels(method: MultiFDMethod) -> list[tuple[bytes, list[bytes]]]:
    """20 packets of 16 pages on each of two channels, interleaved, each decoded by its
    channel's receive context; returns every (payload, pages) in the order sent."""
    sends = [method.send_setup(0), method.send_setup(1)]
    recvs = [method.recv_setup(0), method.recv_setup(1)]
    sent = []
    for i in range(20):
        for ch in (0, 1):
            pages = mixed_pages(16, 1000 * ch + i)
            payload = prepare_payload(sends[ch], pages)
            sent.append((payload, pages))
            got = receive_payload(recvs[ch], payload, 16)
            check_same(b"".join(pages), got, f"packet {i} of channel {ch} decoded wrong")
    return sent


class PluginChecks:
    """Checks of an installed plugin: subclass as ``Test...``, set the attributes and implement
    :meth:`make_method`."""

    name: ClassVar[str]  #: the method's name in the registry
    value: ClassVar[int]  #: its QEMU compression value
    distribution: ClassVar[str]  #: the distribution that registers it
    threaded: ClassVar[bool] = True
    raw_payload: ClassVar[bool] = False
    #: ``method_options`` of the source in the engine round trips
    engine_options: ClassVar[Mapping[str, Any]] = {}
    #: a packet of 128 zero pages compresses to fewer bytes than this
    zero_payload_limit: ClassVar[int] = 4096
    #: what the errors say when a payload decodes to more / fewer bytes than its pages
    more_output_match: ClassVar[str] = "more than"
    less_output_match: ClassVar[str] = "to 12288 bytes"

    def make_method(self, **options: Any) -> MultiFDMethod:
        raise NotImplementedError

    def pair(self, **options: Any) -> tuple[SendContext, RecvContext]:
        """Channel 0's send and receive contexts of a method made with ``options``."""
        method = self.make_method(**options)
        return method.send_setup(0), method.recv_setup(0)

    def test_registered_through_entry_point(self) -> None:
        registry = load_methods()
        info = registry.get(self.name)
        cls = type(self.make_method())
        found = f"{self.name!r} is registered as value {info.value}, {info.cls.__name__}"
        check(info.value == self.value, f"{found}, not value {self.value}")
        check(info.cls is cls, f"{found}, not {cls.__module__}.{cls.__qualname__}")
        check(
            info.distribution.startswith(self.distribution + " "),
            f"{self.name!r} comes from {info.distribution}, not {self.distribution}",
        )
        check(registry.get(self.value) is info, f"value {self.value} is not {self.name!r}")
        for attr in ("threaded", "raw_payload"):
            want, got = getattr(self, attr), getattr(cls, attr)
            check(got is want, f"{cls.__name__}.{attr} is {got}, the checks expect {want}")
        flags = self.make_method().flags
        check(flags == self.value << 1, f"flags {flags:#x}, expected {self.value << 1:#x}")

    def test_zero_random_text_pages(self) -> None:
        send, recv = self.pair()
        rng = random.Random(7)
        for pages in (
            [bytes(PAGE)] * 128,
            [rng.randbytes(PAGE) for _ in range(128)],
            [TEXT[i * 10 : i * 10 + PAGE] for i in range(128)],
        ):
            payload = prepare_payload(send, pages)
            got = receive_payload(recv, payload, len(pages))
            check_same(b"".join(pages), got, "128 zero, random or text pages decoded wrong")
        zero = len(prepare_payload(send, [bytes(PAGE)] * 128))
        check(
            zero < self.zero_payload_limit,
            f"128 zero pages made a payload of {zero} bytes, not under {self.zero_payload_limit}",
        )

    def test_two_channels_interleaved(self) -> None:
        interleave_two_channels(self.make_method())

    def test_more_output_than_pages(self) -> None:
        send, recv = self.pair()
        payload = prepare_payload(send, mixed_pages(3, 12))
        expect_refused(recv, payload, 2, self.more_output_match)

    def test_less_output_than_pages(self) -> None:
        send, recv = self.pair()
        payload = prepare_payload(send, mixed_pages(3, 13))
        expect_refused(recv, payload, 4, self.less_output_match)

    def _through_the_engine(self, channels: int) -> None:
        """Two rounds over in-memory channels, the method picked by name from the registry."""
        sent, received, src, dst = trio.run(
            lambda: migrate_by_name(self.name, self.engine_options, channels=channels)
        )
        check_same(sent, received, "the destination differs from the source", block="pc.ram")
        check(
            src.normal_pages == dst.normal_pages > 0,
            f"normal pages: {src.normal_pages} sent, {dst.normal_pages} received",
        )
        check(
            dst.payload_bytes < dst.normal_pages * PAGE,
            f"{dst.payload_bytes} payload bytes for {dst.normal_pages} pages: nothing compressed",
        )

    def test_migration_through_the_engine_1_channel(self) -> None:
        self._through_the_engine(1)

    def test_migration_through_the_engine_3_channels(self) -> None:
        self._through_the_engine(3)


class StreamChecks(PluginChecks):
    """:class:`PluginChecks` and the checks of a method keeping one compression stream per
    channel (zlib, zstd)."""

    #: what a fresh receiver says of a payload that continues another packet's stream
    own_stream_match: ClassVar[str] = ""

    def test_round_trip_many_packets_with_history(self) -> None:
        round_trips(*self.pair(), packets=60, history=True)

    def test_payload_needs_its_own_stream(self) -> None:
        send, recv = self.pair()
        pages = mixed_pages(32, 11)
        first = prepare_payload(send, pages)
        second = prepare_payload(send, pages)  # refers back to the first packet's bytes
        expect_refused(self.pair()[1], second, 32, self.own_stream_match)
        for n, payload in enumerate((first, second)):
            got = receive_payload(recv, payload, 32)
            check_same(b"".join(pages), got, f"packet {n} of the stream decoded wrong")

    def test_stream_stays_broken_after_error(self) -> None:
        send, recv = self.pair()
        pages = mixed_pages(4, 20)
        first = prepare_payload(send, pages)
        expect_refused(recv, first[:-1], 4)
        expect_refused(recv, first, 4, "earlier error")
