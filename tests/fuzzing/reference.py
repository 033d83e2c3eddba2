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
from dataclasses import dataclass, field
from typing import Any

import xxhash

from multifd_core import MultiFDMethod, load_methods
from multifd_core import mainstream as ms
from multifd_core.errors import MultiFDError
from multifd_core.wire import (
    MULTIFD_EXT_PACKET_CHECKSUM,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC_BYTES,
    PacketRules,
    decode_init,
    decode_packet,
    pages_per_packet,
)

from .recordings import HEADER, PS, QEVM

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
    """Decide what the destination must make of ``conns`` (see :class:`Verdict`)."""
    racy: list[str] = []
    try:
        return _model(conns, method, channels, given, max_device_state, racy)
    except _Invalid as exc:
        return Verdict("invalid", str(exc))
    except MultiFDError as exc:
        return Verdict("invalid", f"{type(exc).__name__}: {exc}")


def _model(
    conns: Sequence[bytes],
    method_name: str,
    channels: int,
    given: Sequence[tuple[str, int]] | None,
    max_device_state: int | None,
    racy: list[str],
) -> Verdict:
    main, by_id, checked = _sort_connections(conns, channels)
    writes = _Writes()
    blocks, rounds = _read_main(main, given, max_device_state, writes)
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
            _model_channel(chan, rules, sizes, method, ctx, rounds, writes, racy)
        finally:
            ctx.recv_cleanup()
    if checked and writes.raced:
        racy.append(f"{len(writes.raced)} page(s) written differently by two sources in a round")
    status = "racy" if racy else "valid"
    return Verdict(status, "; ".join(racy), blocks, _final(writes))


def _sort_connections(
    conns: Sequence[bytes], channels: int
) -> tuple[bytes, dict[int, bytes], set[int]]:
    """The main channel's bytes and each multifd channel's by id, with the handshake rules;
    the ids of the channels that announced packet checksums."""
    mains = [c for c in conns if c[:4] == QEVM]
    chans = [c for c in conns if c[:4] == MULTIFD_MAGIC_BYTES]
    if len(mains) + len(chans) != len(conns):
        raise _Invalid("a connection that is neither main nor multifd")
    if len(conns) != channels + 1:
        raise _Invalid(f"{len(conns)} connections for {channels} channels")
    if len(mains) != 1:
        raise _Invalid(f"{len(mains)} main channels")
    by_id: dict[int, bytes] = {}
    checked: set[int] = set()
    uuids = set()
    for c in chans:
        if len(c) < MULTIFD_INIT_SIZE:
            raise _Invalid("short init packet")
        init = decode_init(c[:MULTIFD_INIT_SIZE], num_channels=channels)
        if init.id in by_id:
            raise _Invalid("duplicate channel id")
        by_id[init.id] = c
        uuids.add(init.uuid)
        if init.features & MULTIFD_EXT_PACKET_CHECKSUM:
            checked.add(init.id)
    if len(uuids) > 1:
        raise _Invalid("channels disagree on the uuid")
    return mains[0], by_id, checked


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
    while pos < len(data):
        if len(data) - pos < HEADER:
            raise _Invalid(f"channel {cid}: short header")
        header = view[pos : pos + HEADER]
        packet = decode_packet(header, rules, sizes)
        pos += HEADER
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
