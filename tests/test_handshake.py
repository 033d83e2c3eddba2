"""The destination's connection classifier, without sockets: each rule, in every order, and
which refusals are junk (closed with a warning, the migration goes on) and which are fatal."""

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
    ChannelClosed,
    DuplicateChannel,
    MainStreamError,
    MigrationTimeout,
    MultiFDError,
    ProtocolError,
    TLSError,
    UuidMismatch,
)
from multifd_core.handshake import (
    HEAD_SIZE,
    Handshake,
    Junk,
    MainChannel,
    MultiFDChannel,
    unidentified,
)
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
class Junked:
    """classify returns Junk: exactly ``error`` with exactly ``message`` (not this migration's
    connection: closed with a warning, the migration goes on)."""

    error: type[MultiFDError]
    message: str


@dataclass(frozen=True)
class Fatal:
    """classify raises exactly ``error`` with exactly ``message`` (the migration fails)."""

    error: type[ProtocolError]
    message: str


Outcome = MainChannel | MultiFDChannel | Junked | Fatal


def uuid_text(raw: bytes) -> str:
    return str(_uuid.UUID(bytes=raw))


def not_matching(chan_id: int, uuid: bytes, ours: bytes) -> Junked:
    return Junked(
        UuidMismatch, f"channel {chan_id} uuid {uuid_text(uuid)} does not match {uuid_text(ours)}"
    )


NEITHER = (
    "a connection starts with {}: neither a main channel (5145564d) nor a multifd channel "
    "(11223344)"
)
SECOND_MAIN = Junked(MainStreamError, "a second main channel (QEVM) connected")
M, C0, C1 = MainChannel(), MultiFDChannel(0, ZERO), MultiFDChannel(1, ZERO)
A0, A1 = MultiFDChannel(0, UUID_A), MultiFDChannel(1, UUID_A)

#: (name, heads in the order they connect, what each is, num_channels, expected_uuid)
CASES: list[tuple[str, list[bytes], list[Outcome], int, bytes | None]] = [
    ("main first", [MAIN, chan(0), chan(1)], [M, C0, C1], 2, None),
    ("channels first", [chan(1), chan(0), MAIN], [C1, C0, M], 2, None),
    ("interleaved", [chan(1), MAIN, chan(0)], [C1, M, C0], 2, None),
    ("second main: junk", [MAIN, MAIN], [M, SECOND_MAIN], 2, None),
    ("second main later", [chan(0), MAIN, chan(1), MAIN], [C0, M, C1, SECOND_MAIN], 2, None),
    (
        "this migration's duplicate id: fatal",
        [chan(1), chan(1), chan(0)],
        [C1, Fatal(DuplicateChannel, "two channels announced id 1"), C0],
        2,
        None,
    ),
    (
        "a later uuid differs from the first: another migration's, junk",
        [chan(0, UUID_A), MAIN, chan(1, UUID_B), chan(1, UUID_A)],
        [A0, M, not_matching(1, UUID_B, UUID_A), A1],
        2,
        None,
    ),
    (
        "the uuid is checked before the id: another migration's channel 0 is no duplicate",
        [chan(0, UUID_A), chan(0, UUID_B), chan(1, UUID_A)],
        [A0, not_matching(0, UUID_B, UUID_A), A1],
        2,
        None,
    ),
    (
        "another migration's id beyond ours: junk",
        [chan(0, UUID_A), chan(7, UUID_B)],
        [A0, not_matching(7, UUID_B, UUID_A)],
        2,
        None,
    ),
    (
        "the source's uuid with an id beyond ours: fatal",
        [chan(0, UUID_A), chan(2, UUID_A)],
        [A0, Fatal(BadChannelId, "channel id 2 outside 0..1")],
        2,
        None,
    ),
    (
        "the expected uuid",
        [chan(1, UUID_A), chan(0, UUID_A)],
        [A1, A0],
        2,
        UUID_A,
    ),
    (
        "not the expected uuid: junk, before it counts as the source's",
        [chan(0, UUID_B), chan(0, UUID_A)],
        [not_matching(0, UUID_B, UUID_A), A0],
        2,
        UUID_A,
    ),
    (
        "an all-zero expected uuid refuses a set one",
        [chan(1, UUID_A)],
        [not_matching(1, UUID_A, ZERO)],
        2,
        ZERO,
    ),
    (
        "the expected uuid is checked before the id",
        [chan(7, UUID_B)],
        [not_matching(7, UUID_B, ZERO)],
        2,
        ZERO,
    ),
    (
        "the expected uuid with an id beyond ours: fatal",
        [chan(2, UUID_A)],
        [Fatal(BadChannelId, "channel id 2 outside 0..1")],
        2,
        UUID_A,
    ),
    (
        "an id beyond ours before any uuid is known: taken as this migration's, fatal",
        [chan(2), chan(1)],
        [Fatal(BadChannelId, "channel id 2 outside 0..1"), C1],
        2,
        None,
    ),
    (
        "a bad init version: junk",
        [MultiFDInit(0, version=2).encode(), chan(0)],
        [Junked(BadVersion, "init packet version 2, expected 1"), C0],
        2,
        None,
    ),
    ("neither magic", [b"GET "], [Junked(BadMagic, NEITHER.format("47455420"))], 2, None),
    (
        "a TLS client hello: the hint",
        [TLS_HELLO],
        [
            Junked(
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
        [Junked(ProtocolError, "a connection's first message is 2 bytes, expected 4"), M],
        2,
        None,
    ),
    (
        "a truncated init packet",
        [chan(0)[:HEAD_SIZE], chan(0)[:63], chan(0)],
        [
            Junked(ProtocolError, "a connection's first message is 4 bytes, expected 64"),
            Junked(ProtocolError, "a connection's first message is 63 bytes, expected 64"),
            C0,
        ],
        2,
        None,
    ),
    (
        "a main channel's message is its magic only",
        [b"QEVM\x00\x00\x00\x03", MAIN],
        [Junked(ProtocolError, "a connection's first message is 8 bytes, expected 4"), M],
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
        if isinstance(outcome, Fatal):
            with pytest.raises(MultiFDError) as info:
                hs.classify(head)
            assert type(info.value) is outcome.error
            assert info.value.message == outcome.message
            assert snapshot(hs) == before  # a refused connection counts for nothing
            continue
        got = hs.classify(bytearray(head))  # what a receive_exactly gives
        if isinstance(outcome, Junked):
            assert isinstance(got, Junk), got
            assert type(got.error) is outcome.error
            assert got.error.message == outcome.message  # type: ignore[attr-defined]
            assert got.reason == f"{outcome.error.__name__}: {outcome.message}"
            assert snapshot(hs) == before  # junk counts for nothing
            continue
        assert got == outcome
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
    junk = hs.classify(chan(3, UUID_B))
    assert dup.value.channel == 2
    assert isinstance(junk, Junk) and junk.reason.startswith("UuidMismatch: channel 3 uuid ")


def test_source_uuid_is_the_first_accepted_channels() -> None:
    hs = Handshake(2, None)
    assert hs.source_uuid is None and not hs.main_accepted and hs.channel_ids == frozenset()
    hs.classify(MAIN)
    assert hs.source_uuid is None
    hs.classify(chan(1, UUID_B))
    assert hs.source_uuid == UUID_B
    assert isinstance(hs.classify(chan(0, UUID_A)), Junk)  # not the source's: junk
    assert hs.source_uuid == UUID_B and not hs.complete
    hs.classify(chan(0, UUID_B))
    assert hs.complete  # main + both channels


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        # a ChannelIO names an unnamed connection "main channel": junk never was one
        (ChannelClosed("closed by peer before its first message"), "ChannelClosed: closed by "),
        (TLSError("TLS handshake failed: unknown ca", channel=None), "TLSError: TLS handshake"),
        (MigrationTimeout("sent no handshake within 1 s"), "MigrationTimeout: sent no "),
    ],
)
def test_a_failure_before_the_first_message_is_junk(error: MultiFDError, reason: str) -> None:
    """EOF, a failed TLS handshake, silence: never this migration's channel, whatever it was."""
    junk = unidentified(error)
    assert junk == Junk(error)
    assert junk.reason.startswith(reason) and "main channel" not in junk.reason
    assert junk.reason == f"{type(error).__name__}: {getattr(error, 'message', error)}"


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
) -> tuple[str, type[MultiFDError]] | None:
    """How the rules refuse ``conn`` ("junk" or "fatal", and the error), given what was
    accepted before (None: accepted)."""
    kind, chan_id, uuid = conn
    if kind == "main":
        return ("junk", MainStreamError) if main else None
    if kind == "junk":
        return "junk", BadMagic
    ours = hs.expected_uuid if hs.expected_uuid is not None else source
    if ours is not None and uuid != ours:
        return "junk", UuidMismatch  # another migration's: before the id
    if chan_id >= hs.num_channels:
        return "fatal", BadChannelId
    return ("fatal", DuplicateChannel) if chan_id in ids else None


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
        if want is not None and want[0] == "fatal":
            with pytest.raises(MultiFDError) as info:
                hs.classify(head)
            assert type(info.value) is want[1]
        elif want is not None:
            got = hs.classify(head)
            assert isinstance(got, Junk) and type(got.error) is want[1]
        elif kind == "main":
            assert hs.classify(head) == MainChannel()
            main = True
        else:
            assert hs.classify(head) == MultiFDChannel(chan_id, uuid)
            ids.add(chan_id)
            source = uuid if source is None else source
        assert snapshot(hs) == (main, frozenset(ids), source)
        assert hs.complete == (main and len(ids) == num_channels)
