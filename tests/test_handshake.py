"""The destination's connection classifier, without sockets: each rule, in every order."""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multifd_core.errors import (
    BadChannelId,
    BadMagic,
    BadVersion,
    DuplicateChannel,
    MainStreamError,
    MultiFDError,
    ProtocolError,
    UuidMismatch,
)
from multifd_core.handshake import HEAD_SIZE, Handshake, MainChannel, MultiFDChannel
from multifd_core.wire import MultiFDInit

UUID_A = bytes(range(16))
UUID_B = bytes(range(16, 32))
ZERO = bytes(16)
MAIN = b"QEVM"
ZERO_TEXT = "00000000-0000-0000-0000-000000000000"
TLS_HELLO = b"\x16\x03\x01\x02"  # a TLS record header: handshake, TLS 1.x, length...


def chan(chan_id: int, uuid: bytes = ZERO) -> bytes:
    return MultiFDInit(chan_id, uuid).encode()


def snapshot(hs: Handshake) -> tuple[bool, frozenset[int], bytes | None]:
    return hs.main_accepted, hs.channel_ids, hs.source_uuid


# --- how many bytes to read ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "needed"),
    [
        (MAIN, 4),
        (b"\x11\x22\x33\x44", 64),
        (bytearray(b"\x11\x22\x33\x44"), 64),
        (chan(3), 64),  # more than the head given: the magic decides
        (TLS_HELLO, 4),
        (b"GET ", 4),
        (b"\x00\x00\x00\x00", 4),
        (b"", 4),  # fewer than HEAD_SIZE bytes: read up to HEAD_SIZE first
        (b"\x11\x22\x33", 4),
    ],
)
def test_bytes_needed(head: bytes, needed: int) -> None:
    assert HEAD_SIZE == 4
    assert Handshake(2, None).bytes_needed(head) == needed


# --- one connection at a time, in the orders that matter ----------------------------------


@dataclass(frozen=True)
class Refused:
    """classify raises exactly ``error`` with exactly ``message``."""

    error: type[ProtocolError]
    message: str


Outcome = MainChannel | MultiFDChannel | Refused


def uuid_text(raw: bytes) -> str:
    return str(_uuid.UUID(bytes=raw))


NEITHER = (
    "a connection starts with {}: neither a main channel (5145564d) nor a multifd channel "
    "(11223344)"
)
SECOND_MAIN = Refused(MainStreamError, "a second main channel (QEVM) connected")
M, C0, C1 = MainChannel(), MultiFDChannel(0, ZERO), MultiFDChannel(1, ZERO)

#: (name, heads in the order they connect, what each is, num_channels, expected_uuid)
CASES: list[tuple[str, list[bytes], list[Outcome], int, bytes | None]] = [
    ("main first", [MAIN, chan(0), chan(1)], [M, C0, C1], 2, None),
    ("channels first", [chan(1), chan(0), MAIN], [C1, C0, M], 2, None),
    ("interleaved", [chan(1), MAIN, chan(0)], [C1, M, C0], 2, None),
    ("second main", [MAIN, MAIN], [M, SECOND_MAIN], 2, None),
    ("second main later", [chan(0), MAIN, chan(1), MAIN], [C0, M, C1, SECOND_MAIN], 2, None),
    (
        "duplicate id",
        [chan(1), chan(1), chan(0)],
        [C1, Refused(DuplicateChannel, "two channels announced id 1"), C0],
        2,
        None,
    ),
    (
        "a later uuid differs from the first",
        [chan(0, UUID_A), MAIN, chan(1, UUID_B), chan(1, UUID_A)],
        [
            MultiFDChannel(0, UUID_A),
            M,
            Refused(
                UuidMismatch,
                f"channel 1 has uuid {UUID_B.hex()}, channel(s) before it {UUID_A.hex()}",
            ),
            MultiFDChannel(1, UUID_A),
        ],
        2,
        None,
    ),
    (
        "the uuid is checked before the id",
        [chan(0, UUID_A), chan(0, UUID_B)],
        [
            MultiFDChannel(0, UUID_A),
            Refused(
                UuidMismatch,
                f"channel 0 has uuid {UUID_B.hex()}, channel(s) before it {UUID_A.hex()}",
            ),
        ],
        2,
        None,
    ),
    (
        "the expected uuid",
        [chan(1, UUID_A), chan(0, UUID_A)],
        [MultiFDChannel(1, UUID_A), MultiFDChannel(0, UUID_A)],
        2,
        UUID_A,
    ),
    (
        "not the expected uuid: refused before it counts as the source's",
        [chan(0, UUID_B), chan(0, UUID_A)],
        [
            Refused(
                UuidMismatch,
                f"channel 0 uuid {uuid_text(UUID_B)} does not match {uuid_text(UUID_A)}",
            ),
            MultiFDChannel(0, UUID_A),
        ],
        2,
        UUID_A,
    ),
    (
        "an all-zero expected uuid refuses a set one",
        [chan(1, UUID_A)],
        [Refused(UuidMismatch, f"channel 1 uuid {uuid_text(UUID_A)} does not match {ZERO_TEXT}")],
        2,
        ZERO,
    ),
    (
        "the expected uuid is checked before the id",
        [chan(7, UUID_B)],
        [Refused(UuidMismatch, f"channel 7 uuid {uuid_text(UUID_B)} does not match {ZERO_TEXT}")],
        2,
        ZERO,
    ),
    (
        "a channel id beyond this side's channels",
        [chan(2), chan(1)],
        [Refused(BadChannelId, "channel id 2 outside 0..1"), C1],
        2,
        None,
    ),
    (
        "a bad init version",
        [MultiFDInit(0, version=2).encode()],
        [Refused(BadVersion, "init packet version 2, expected 1")],
        2,
        None,
    ),
    ("neither magic", [b"GET "], [Refused(BadMagic, NEITHER.format("47455420"))], 2, None),
    (
        "a TLS client hello: the hint",
        [TLS_HELLO],
        [
            Refused(
                BadMagic,
                NEITHER.format("16030102")
                + " (a TLS handshake: the peer uses TLS, this side does not)",
            )
        ],
        2,
        None,
    ),
    (
        "a truncated head",
        [b"QE", MAIN],
        [Refused(ProtocolError, "a connection's first message is 2 bytes, expected 4"), M],
        2,
        None,
    ),
    (
        "a truncated init packet",
        [chan(0)[:HEAD_SIZE], chan(0)[:63], chan(0)],
        [
            Refused(ProtocolError, "a connection's first message is 4 bytes, expected 64"),
            Refused(ProtocolError, "a connection's first message is 63 bytes, expected 64"),
            C0,
        ],
        2,
        None,
    ),
    (
        "a main channel's message is its magic only",
        [b"QEVM\x00\x00\x00\x03", MAIN],
        [Refused(ProtocolError, "a connection's first message is 8 bytes, expected 4"), M],
        2,
        None,
    ),
]


@pytest.mark.parametrize(
    ("heads", "outcomes", "num_channels", "expected_uuid"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_rules(
    heads: list[bytes], outcomes: list[Outcome], num_channels: int, expected_uuid: bytes | None
) -> None:
    hs = Handshake(num_channels, expected_uuid)
    for head, outcome in zip(heads, outcomes, strict=True):
        before = snapshot(hs)
        if isinstance(outcome, Refused):
            with pytest.raises(MultiFDError) as info:
                hs.classify(head)
            assert type(info.value) is outcome.error
            assert info.value.message == outcome.message
            assert snapshot(hs) == before  # a refused connection counts for nothing
            continue
        assert hs.classify(bytearray(head)) == outcome  # what a receive_exactly gives
        if isinstance(outcome, MainChannel):
            assert snapshot(hs) == (True, before[1], before[2])
        else:
            source = before[2] if before[2] is not None else outcome.uuid
            assert snapshot(hs) == (before[0], before[1] | {outcome.id}, source)


def test_refusals_name_the_channel() -> None:
    hs = Handshake(4, None)
    hs.classify(chan(2, UUID_A))
    with pytest.raises(DuplicateChannel) as dup:
        hs.classify(chan(2, UUID_A))
    with pytest.raises(UuidMismatch) as mismatch:
        hs.classify(chan(3, UUID_B))
    assert dup.value.channel == 2 and mismatch.value.channel == 3


def test_source_uuid_is_the_first_accepted_channels() -> None:
    hs = Handshake(2, None)
    assert hs.source_uuid is None and not hs.main_accepted and hs.channel_ids == frozenset()
    hs.classify(MAIN)
    assert hs.source_uuid is None
    hs.classify(chan(1, UUID_B))
    assert hs.source_uuid == UUID_B


# --- every order: the handshake against a model of its rules ------------------------------

connection = st.one_of(
    st.just(("main", 0, ZERO)),
    st.tuples(st.just("chan"), st.integers(0, 4), st.sampled_from([ZERO, UUID_A, UUID_B])),
    st.tuples(st.just("junk"), st.just(0), st.just(ZERO)),
)


def model_refusal(
    conn: tuple[str, int, bytes],
    hs: Handshake,
    main: bool,
    ids: set[int],
    source: bytes | None,
) -> type[MultiFDError] | None:
    """What the rules refuse ``conn`` with, given what was accepted before (None: accepted)."""
    kind, chan_id, uuid = conn
    if kind == "main":
        return MainStreamError if main else None
    if kind == "junk":
        return BadMagic
    if hs.expected_uuid is not None and uuid != hs.expected_uuid:
        return UuidMismatch  # decode_init: before the id
    if chan_id >= hs.num_channels:
        return BadChannelId
    if source not in (None, uuid):
        return UuidMismatch
    return DuplicateChannel if chan_id in ids else None


@given(
    st.lists(connection, max_size=10),
    st.integers(1, 4),
    st.sampled_from([None, ZERO, UUID_A]),
)
def test_any_order_follows_the_rules(
    conns: list[tuple[str, int, bytes]], num_channels: int, expected: bytes | None
) -> None:
    hs = Handshake(num_channels, expected)
    main, source = False, None
    ids: set[int] = set()
    for kind, chan_id, uuid in conns:
        head = MAIN if kind == "main" else chan(chan_id, uuid) if kind == "chan" else b"\0\0\0\0"
        want = model_refusal((kind, chan_id, uuid), hs, main, ids, source)
        if want is not None:
            with pytest.raises(MultiFDError) as info:
                hs.classify(head)
            assert type(info.value) is want
        elif kind == "main":
            assert hs.classify(head) == MainChannel()
            main = True
        else:
            assert hs.classify(head) == MultiFDChannel(chan_id, uuid)
            ids.add(chan_id)
            source = uuid if source is None else source
        assert snapshot(hs) == (main, frozenset(ids), source)
