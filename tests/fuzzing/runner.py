"""One case run: the destination receives a case's connections into guarded blocks, within a
time bound and (traced) memory bound, and its outcome is checked against the reference model."""

from __future__ import annotations

import random
import time
import traceback
import tracemalloc
from dataclasses import dataclass
from typing import Any

import trio

from multifd_core import RAMBlock, open_destination
from multifd_core.errors import MultiFDError

from .delivery import Case, ReplayStream, feed_socket
from .recordings import PS, QEVM
from .reference import Verdict, method_named, model
from .seeds import Seed

GUARD = 4096
GUARD_BYTE = 0x5A
INITIAL_BYTE = 0xA5  # what a destination block holds before the migration (unless known_zero)


@dataclass(frozen=True)
class Config:
    """The destination's own timeouts (each case must end by itself well before ``bound``)."""

    connect_timeout: float = 0.5
    handshake_timeout: float = 0.5
    drain_timeout: float = 0.5
    idle_timeout: float = 0.5
    bound: float = 10.0
    max_device_state: int = 1 << 20
    trace_memory: bool = True
    #: Bytes of a connection are delivered in about this many chunks at most.
    max_reads: int = 400


@dataclass
class Result:
    outcome: str  # "completed-correct", an error class name, or "VIOLATION:<kind>"
    detail: str
    seconds: float
    peak: int
    verdict: str

    @property
    def violation(self) -> bool:
        return self.outcome.startswith("VIOLATION")


def memory_bound(case: Case, cfg: Config) -> int:
    """The most the destination may allocate (traced) for one case.

    Per channel: its header (1344) and payload buffer (a compressed packet's largest size,
    ~530 KiB), a read-ahead buffer (256 KiB) and one decompressed packet (512 KiB). The main
    channel: its unparsed input, twice over (the parser's buffer compacts at half), and the device
    state it keeps, at most ``max_device_state``. Plus 4 MiB for trio, the stats and the error.
    """
    per_channel = 2 << 20
    main = max((len(c) for c in case.conns if c[:4] == QEVM), default=0)
    return (len(case.conns) + 1) * per_channel + 2 * main + cfg.max_device_state + (4 << 20)


def _options(case: Case, cfg: Config, blocks: list[RAMBlock]) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        channels=case.channels,
        method=method_named(case.method),  # an instance: no plugin loading per case
        blocks=blocks,
        connect_timeout=cfg.connect_timeout,
        handshake_timeout=cfg.handshake_timeout,
        drain_timeout=cfg.drain_timeout,
        max_device_state=cfg.max_device_state,
        idle_timeout=cfg.idle_timeout,
    )
    return opts


async def _destination(
    case: Case, cfg: Config, blocks: list[RAMBlock]
) -> tuple[str, BaseException | None]:
    rng = random.Random(case.chunk_seed)
    send, recv = trio.open_memory_channel[trio.abc.Stream](len(case.conns) + 1)
    feeders: list[tuple[trio.SocketStream, bytes, random.Random]] = []
    for data in case.conns:
        crng = random.Random(rng.getrandbits(32))
        if case.transport == "socket":
            a, b = trio.socket.socketpair()
            near, far = trio.SocketStream(a), trio.SocketStream(b)
            feeders.append((near, data, crng))
            send.send_nowait(far)
        else:
            send.send_nowait(ReplayStream(data, crng, cfg.max_reads))

    async def accept() -> trio.abc.Stream:
        return await recv.receive()  # no more connections: waits, as a quiet listener does

    try:
        async with trio.open_nursery() as nursery:
            for near, data, crng in feeders:
                nursery.start_soon(feed_socket, near, data, crng, cfg.max_reads)
            try:
                async with open_destination(accept, **_options(case, cfg, blocks)) as dst:
                    await dst.wait()
                return "completed", None
            except MultiFDError as exc:
                return type(exc).__name__, exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # connections never accepted (the destination failed first)
        while True:
            try:
                stream = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            await stream.aclose()
        for near, _, _ in feeders:
            await near.aclose()


def _guarded(case: Case) -> tuple[list[RAMBlock], list[bytearray], list[bytes]]:
    blocks, backings, initial = [], [], []
    for name, size in case.blocks:
        fill = 0 if case.known_zero else INITIAL_BYTE
        backing = bytearray(
            bytes((GUARD_BYTE,)) * GUARD + bytes((fill,)) * size + bytes((GUARD_BYTE,)) * GUARD
        )
        view = memoryview(backing)[GUARD : GUARD + size]
        blocks.append(RAMBlock(name, view, PS, known_zero=case.known_zero))
        backings.append(backing)
        initial.append(bytes((fill,)) * size)
    return blocks, backings, initial


def run_case(case: Case, cfg: Config = Config()) -> Result:
    """Run one case in a fresh trio run; check every invariant."""
    verdict = model(case.conns, case.method, case.channels, case.blocks,
                    max_device_state=cfg.max_device_state)  # fmt: skip
    blocks, backings, initial = _guarded(case)
    outcome, detail, peak, seconds = _run_traced(case, cfg, blocks)
    for b in blocks:
        b.host.release()
    outcome, detail = _judge(case, cfg, outcome, detail, peak, backings, initial, verdict)
    return Result(outcome, detail, seconds, peak, f"{verdict.status}: {verdict.reason}"[:300])


def _run_traced(case: Case, cfg: Config, blocks: list[RAMBlock]) -> tuple[str, str, int, float]:
    """The destination's outcome (or a hang / untyped violation), its detail, the traced memory
    peak and the seconds it took."""
    started = time.perf_counter()
    exc: BaseException | None = None
    detail = ""
    if cfg.trace_memory:
        tracemalloc.start()
    try:

        async def main() -> tuple[str, BaseException | None]:
            with trio.fail_after(cfg.bound):
                return await _destination(case, cfg, blocks)

        outcome, exc = trio.run(main)
    except trio.TooSlowError:
        outcome = "VIOLATION:hang"
        detail = f"no end within {cfg.bound} s"
    except BaseException as raised:
        if isinstance(raised, KeyboardInterrupt):
            raise
        outcome = "VIOLATION:untyped"
        detail = "".join(traceback.format_exception(raised))
    finally:
        peak = tracemalloc.get_traced_memory()[1] if cfg.trace_memory else 0
        if cfg.trace_memory:
            tracemalloc.stop()
    seconds = time.perf_counter() - started
    if exc is not None:
        detail = f"{type(exc).__name__}: {exc}"
    return outcome, detail, peak, seconds


def _judge(
    case: Case,
    cfg: Config,
    outcome: str,
    detail: str,
    peak: int,
    backings: list[bytearray],
    initial: list[bytes],
    verdict: Verdict,
) -> tuple[str, str]:
    """The case's outcome and detail after every check, in order: the run's own violation, the
    guards, the memory bound, then the outcome against the model."""
    if outcome.startswith("VIOLATION"):
        return outcome, detail
    for (name, size), backing in zip(case.blocks, backings, strict=True):
        if (
            backing[:GUARD].count(GUARD_BYTE) != GUARD
            or backing[GUARD + size :].count(GUARD_BYTE) != GUARD
        ):
            return "VIOLATION:write-outside-block", f"guard of {name!r} changed; {detail}"
    bound = memory_bound(case, cfg)
    if cfg.trace_memory and peak > bound:
        return "VIOLATION:memory", f"peak {peak} > bound {bound}; {detail}"
    if outcome == "completed":
        if verdict.status == "invalid":
            return "VIOLATION:accepted-invalid", verdict.reason
        wrong = _wrong_pages(case, backings, initial, verdict)
        if wrong:
            return "VIOLATION:wrong-data", wrong
        return "completed-correct", ""
    if verdict.status == "valid":
        return "VIOLATION:rejected-valid", detail
    return outcome, detail


def _wrong_pages(
    case: Case, backings: list[bytearray], initial: list[bytes], verdict: Verdict
) -> str:
    """Where the memory differs from the model: a written page must hold one of its allowed
    contents, every other page its initial bytes."""
    by_block: dict[str, list[tuple[int, set[bytes]]]] = {}
    for (bname, off), values in verdict.final.items():
        by_block.setdefault(bname, []).append((off, values))
    for (name, size), backing, init in zip(case.blocks, backings, initial, strict=True):
        got = bytearray(backing[GUARD : GUARD + size])
        for off, values in by_block.get(name, ()):
            if values and bytes(got[off : off + PS]) not in values:
                return (
                    f"block {name!r} page {off:#x} holds none of its {len(values)} allowed values"
                )
            got[off : off + PS] = init[off : off + PS]
        if got != init:
            for off in range(0, size, PS):
                if got[off : off + PS] != init[off : off + PS]:
                    return f"block {name!r} page {off:#x} changed, but nothing was sent for it"
    return ""


def check_seed(seed: Seed, cfg: Config = Config()) -> Result:
    """Replay a seed unchanged: it must complete and equal the source's memory."""
    case = Case(seed.name, seed.method, seed.channels, list(seed.blocks), list(seed.conns), [],
                0, "memory", False)  # fmt: skip
    res = run_case(case, cfg)
    if res.outcome == "completed-correct" and seed.expected is not None:
        verdict = model(seed.conns, seed.method, seed.channels, seed.blocks)
        for name, size in seed.blocks:
            want = bytearray(bytes((INITIAL_BYTE,)) * size)
            for (bname, off), values in verdict.final.items():
                if bname == name:
                    (want[off : off + PS],) = values
            if bytes(want) != seed.expected[name]:
                res.outcome = "VIOLATION:model-disagrees-with-source"
    return res
