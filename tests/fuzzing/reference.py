"""The reference model: an independent reading of a case's bytes, saying what the destination
must make of them (:class:`Verdict`).

It uses the sans-I/O codecs and the method's receive contexts, no I/O: which connections are
what, which pages each round writes, and which orders of writes the destination's SYNC barrier
leaves open. The input is valid (the destination must complete), invalid (it must fail) or racy
(either is right; e.g. pages before a channel's first SYNC, which may arrive before the main
channel announced the blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import xxhash

from multifd_core import MultiFDMethod, load_methods
from multifd_core import mainstream as ms
from multifd_core.errors import BadVersion, MultiFDError
from multifd_core.extension import MULTIFD_EXT_PACKET_CHECKSUM
from multifd_core.options import DestinationOptions
from multifd_core.wire import (
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC_BYTES,
    PacketRules,
    decode_init,
    decode_packet,
    pages_per_packet,
)

from .recordings import PS, QEVM

_REGISTRY = None


def method_named(name: str) -> MultiFDMethod:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_methods()
    return _REGISTRY.create(name)


@dataclass
class Verdict:
    """What the destination must do with a case.

    ``status``: "valid" (must complete with ``final`` memory), "invalid" (must fail), or "racy"
    (either; if it completes, the memory must still agree with ``final``). ``final`` maps
    (block, offset) to the page contents the SYNC barrier allows there (empty: any, where two
    sources write the page differently in its last round).
    """

    status: str
    reason: str = ""
    blocks: tuple[tuple[str, int], ...] = ()
    final: dict[tuple[str, int], set[bytes]] = field(default_factory=dict)


class _Invalid(Exception):
    pass


class _Writes(dict[tuple[str, int], tuple[int, dict[str, bytes]]]):
    """Per page, the latest round that writes it and each source's last write there; and in
    ``raced`` the pages two sources write differently in one same round, any round."""

    def __init__(self) -> None:
        super().__init__()
        self.by_round: dict[tuple[str, int, int], dict[bytes, set[str]]] = {}
        self.raced: set[tuple[str, int]] = set()


def _note(writes: _Writes, key: tuple[str, int], rnd: int, source: str, data: bytes) -> None:
    """Keep, per page, the latest round that writes it and each source's last write there."""
    have = writes.get(key)
    if have is None or rnd > have[0]:
        writes[key] = (rnd, {source: data})
    elif rnd == have[0]:
        have[1][source] = data
    # a packet's checksum reads the page back after writing it: another source writing other
    # bytes there in the same round (unordered by the barrier) may come in between
    seen = writes.by_round.setdefault((*key, rnd), {})
    seen.setdefault(xxhash.xxh3_64_digest(data), set()).add(source)
    if len(seen) > 1 and len(set().union(*seen.values())) > 1:
        writes.raced.add(key)


def model(
    conns: Sequence[bytes],
    method: str,
    channels: int,
    given: Sequence[tuple[str, int]] | None,
    *,
    max_device_state: int | None = 1 << 20,
) -> Verdict:
    """Decide what the destination must make of ``conns`` (see :class:`Verdict`). Which
    connection is the main channel and which uuid is the migration's may depend on the order in
    which the handshakes end (:func:`_scenarios`): each order is modelled, and where they
    disagree the case is racy."""
    verdicts = []
    try:
        scenarios = _scenarios(conns, channels)
    except MultiFDError as exc:  # an init packet of ours that breaks a rule (fatal)
        return Verdict("invalid", f"{type(exc).__name__}: {exc}")
    for scenario in scenarios:
        racy: list[str] = []
        try:
            if isinstance(scenario, str):
                raise _Invalid(scenario)
            main, by_id = scenario
            verdicts.append(_model(main, by_id, method, given, max_device_state, racy))
        except _Invalid as exc:
            verdicts.append(Verdict("invalid", str(exc)))
        except MultiFDError as exc:
            verdicts.append(Verdict("invalid", f"{type(exc).__name__}: {exc}"))
    return _combine(verdicts)


def _combine(verdicts: list[Verdict]) -> Verdict:
    """One verdict for the scenarios': theirs when they agree, else racy, where a page may hold
    what any scenario that completes writes there (anything, where they differ)."""
    done = [v for v in verdicts if v.status != "invalid"]
    if len(verdicts) == 1 or not done:
        return verdicts[0]
    first = done[0]
    if len(done) == len(verdicts) and all(
        v.status == first.status and v.final == first.final for v in done
    ):
        return first
    keys = {key for v in done for key in v.final}
    final = {}
    for key in keys:
        values = [v.final.get(key) for v in done]
        allowed: set[bytes] = set()
        if all(values):  # written, with known contents, in every one
            allowed = set().union(*values)
        final[key] = allowed
    reasons = "; ".join(v.reason or v.status for v in verdicts)
    return Verdict("racy", f"the handshakes' order decides: {reasons}", first.blocks, final)


def _model(
    main: bytes,
    by_id: dict[int, bytes],
    method_name: str,
    given: Sequence[tuple[str, int]] | None,
    max_device_state: int | None,
    racy: list[str],
) -> Verdict:
    writes = _Writes()
    blocks, rounds = _read_main(main, given, max_device_state, writes)
    inits = {cid: decode_init(d[:MULTIFD_INIT_SIZE], num_channels=256) for cid, d in by_id.items()}
    checked = {cid for cid, init in inits.items() if init.features & MULTIFD_EXT_PACKET_CHECKSUM}
    method = method_named(method_name)
    rules = PacketRules(
        page_size=PS,
        max_pages=pages_per_packet(PS),
        compression=method.value,
        payload_size=method.payload_size,
        zero_pages_field=True,  # as the destination reads them (DestinationOptions default)
    )
    sizes = dict(blocks)
    for cid, data in by_id.items():
        ctx = method.recv_setup(cid)
        try:
            chan = _Channel(cid, data, cid in checked)
            chan_rules = _channel_rules(rules, inits[cid].packet_pages, cid)
            _model_channel(chan, chan_rules, sizes, method, ctx, rounds, writes, racy)
        finally:
            ctx.recv_cleanup()
    if checked and writes.raced:
        racy.append(f"{len(writes.raced)} page(s) written differently by two sources in a round")
    status = "racy" if racy else "valid"
    return Verdict(status, "; ".join(racy), blocks, _final(writes))


def _channel_rules(rules: PacketRules, pages: int, cid: int) -> PacketRules:
    """A channel's packets: QEMU's size, or the pages its init packet announced, up to the
    destination's max_packet_size (the DestinationOptions default) when above QEMU's."""
    if not pages or pages == rules.max_pages:
        return rules
    if pages > rules.max_pages and pages * PS > DestinationOptions().max_packet_size:
        raise _Invalid(f"channel {cid}: packets of {pages} pages above max_packet_size")
    return replace(rules, max_pages=pages)


def _junk(conn: bytes) -> bool:
    """Not the migration's, whatever the others are (the destination closes it with a warning
    and goes on): too short for its first message, neither magic, another init version."""
    if conn[:4] == QEVM:
        return False
    if conn[:4] != MULTIFD_MAGIC_BYTES or len(conn) < MULTIFD_INIT_SIZE:
        return True
    try:  # another init version, or another multifd-py extension version
        decode_init(conn[:MULTIFD_INIT_SIZE], num_channels=256)
    except BadVersion:
        return True
    except MultiFDError:  # unknown extension features: this migration's, refused (fatal)
        return False
    return False


Scenario = tuple[bytes, dict[int, bytes]] | str


def _scenarios(conns: Sequence[bytes], channels: int) -> list[Scenario]:
    """Each way the handshake rules may sort ``conns``: the main channel's bytes and each
    multifd channel's by id, or why that way fails. The first QEVM read is the main channel
    (a later one is junk); the first valid init packet read gives the migration's uuid (one of
    another uuid is junk), and an id beyond ``channels`` or a duplicate id of that uuid fails.
    Which connection is read first is any: their bytes come in chunks of random sizes."""
    rest = [c for c in conns if not _junk(c)]
    mains = sorted({c for c in rest if c[:4] == QEVM})
    inits = [
        (decode_init(c[:MULTIFD_INIT_SIZE], num_channels=256), c) for c in rest if c[:4] != QEVM
    ]
    if not mains:
        return ["no main channel"]
    sets: dict[object, dict[int, bytes] | str] = {}
    for uuid in sorted({init.uuid for init, _ in inits}):
        ours = [(init.id, c) for init, c in inits if init.uuid == uuid]
        by_id = dict(ours)
        if any(cid >= channels for cid, _ in ours):
            sets["beyond"] = f"a channel id beyond {channels} channels"
        elif len(by_id) < len(ours):
            sets["duplicate"] = "duplicate channel id"
        elif len(by_id) != channels:
            sets[("short", uuid)] = f"{len(by_id)} channel(s) of the migration's uuid"
        else:
            sets[uuid] = by_id
    if not sets:
        sets[None] = "no multifd channel"
    return [
        (main, found) if isinstance(found, dict) else found
        for main in mains
        for found in sets.values()
    ]


def _read_main(
    main: bytes,
    given: Sequence[tuple[str, int]] | None,
    max_device_state: int | None,
    writes: _Writes,
) -> tuple[tuple[tuple[str, int], ...], int]:
    """Note the main stream's page writes; its blocks and how many rounds it ends."""
    parser = ms.MainStreamParser(page_size=PS, max_device_state=max_device_state)
    parser.feed(main)
    parser.feed_eof()
    blocks: tuple[tuple[str, int], ...] = ()
    rounds = 0
    while True:
        ev = parser.next_event()
        if ev is ms.NEED_DATA:
            raise AssertionError("the parser needs data after EOF")
        if isinstance(ev, ms.ConnectionEnd):
            return blocks, rounds
        if isinstance(ev, ms.RamBlocks):
            blocks = ev.blocks
            _check_blocks(blocks, given)
        elif isinstance(ev, ms.ZeroPage):
            _note(writes, (ev.block, ev.offset), rounds, "main", bytes((ev.fill,)) * PS)
        elif isinstance(ev, ms.Page):
            _note(writes, (ev.block, ev.offset), rounds, "main", bytes(ev.data))
        elif isinstance(ev, ms.RoundEnd):
            rounds += 1


def _check_blocks(
    blocks: tuple[tuple[str, int], ...], given: Sequence[tuple[str, int]] | None
) -> None:
    if given is None:
        return
    sizes = dict(given)
    for name, size in blocks:
        if sizes.get(name) != size:
            raise _Invalid(f"block {name!r} of {size} bytes does not match")


def _final(writes: _Writes) -> dict[tuple[str, int], set[bytes]]:
    """Two sources writing one page differently in the same round race byte by byte (a
    packet's payload lands in pieces while the main channel may fill the page): any content is
    right."""
    final = {}
    for key, (_, by_source) in writes.items():
        values = set(by_source.values())
        final[key] = values if len(values) == 1 else set()
    return final


def _check_order(cid: int, syncs: int, rounds: int, racy: list[str]) -> None:
    """Pages of a packet after ``syncs`` SYNCs of the channel: invalid past the last round,
    racy (the order the destination lands them in is not fixed) at either end."""
    if syncs > rounds:
        raise _Invalid(f"channel {cid}: pages after the last round")
    if syncs == rounds:
        racy.append(f"channel {cid}: pages after its last needed SYNC")
    if syncs == 0:
        racy.append(f"channel {cid}: pages before its first SYNC")


def _decoded(payload: memoryview, npages: int, method: MultiFDMethod, ctx: Any) -> bytes:
    if method.raw_payload:
        return bytes(payload)
    out = bytearray(npages * PS)
    ctx.recv_pages(payload, [memoryview(out)])
    return bytes(out)


@dataclass
class _Channel:
    id: int
    data: bytes
    checksums: bool  # its init announced packet checksums


def _checksum_ok(header: memoryview, pages: bytes) -> bool:
    """The packet checksum rule of docs/wire-extensions.md, read independently of the library:
    XXH3-64 of the pages then the header without its bytes 40..47, stored there (be64)."""
    h = xxhash.xxh3_64(pages)
    h.update(header[:40])
    h.update(header[48:])
    return h.intdigest() == int.from_bytes(header[40:48], "big")


def _model_channel(
    chan: _Channel,
    rules: PacketRules,
    sizes: dict[str, int],
    method: MultiFDMethod,
    ctx: Any,
    rounds: int,
    writes: _Writes,
    racy: list[str],
) -> None:
    cid, data = chan.id, chan.data
    pos = MULTIFD_INIT_SIZE
    syncs = 0
    source = f"ch{cid}"
    view = memoryview(data)
    size = rules.header_size
    while pos < len(data):
        if len(data) - pos < size:
            raise _Invalid(f"channel {cid}: short header")
        header = view[pos : pos + size]
        packet = decode_packet(header, rules, sizes)
        pos += size
        if packet.normal_pages or packet.zero_pages:
            _check_order(cid, syncs, rounds, racy)
        pages = b""
        if packet.normal_pages:
            n = packet.next_packet_size
            if len(data) - pos < n:
                raise _Invalid(f"channel {cid}: short payload")
            pages = _decoded(view[pos : pos + n], packet.normal_pages, method, ctx)
            pos += n
        if chan.checksums and not _checksum_ok(header, pages):
            raise _Invalid(f"channel {cid}: packet {packet.packet_num}: checksum differs")
        if packet.normal_pages:
            for i, off in enumerate(packet.normal_offsets):
                _note(writes, (packet.ramblock, off), syncs, source, pages[i * PS : i * PS + PS])
        for off in packet.zero_offsets:  # zero pages listed in the packet (QEMU 9.0+)
            _note(writes, (packet.ramblock, off), syncs, source, bytes(PS))
        if packet.sync:
            syncs += 1
    if syncs < rounds:
        raise _Invalid(f"channel {cid}: {syncs} SYNCs for {rounds} rounds")
