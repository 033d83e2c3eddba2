"""multifd_core.testing's loopback harness itself: hooks, side tasks, errors and its bound."""

from __future__ import annotations

import pytest
import trio

from multifd_core import RAMBlock
from multifd_core.errors import BadChannelId, ChannelClosed
from multifd_core.testing import LoopbackRun, image_blocks, run_loopback


async def test_hooks_rounds_and_side_tasks() -> None:
    blocks = image_blocks(1 << 20)
    calls: list[int] = []
    side_ended = trio.Event()

    async def side() -> None:
        try:
            await trio.sleep_forever()
        finally:
            side_ended.set()

    def on_open(r: int, run: LoopbackRun) -> None:
        calls.append(r)
        run.start_soon(side)

    async def between_rounds(r: int, run: LoopbackRun) -> None:
        calls.append(r)
        blocks[0].mark_all_dirty()

    run = await run_loopback(blocks, rounds=3, on_open=on_open, between_rounds=between_rounds)
    assert calls == [0, 1, 2]
    assert side_ended.is_set()  # cancelled once the source ended
    assert run.src_stats is not None and run.dst_stats is not None
    assert run.src_stats.rounds == 3 and run.dst_stats.status == "completed"
    assert run.dst_blocks["pc.ram"].host.tobytes() == bytes(blocks[0].memory)
    assert run.src_error is None and run.dst_error is None


async def test_errors_raised_or_captured() -> None:
    block = RAMBlock("ram", bytearray(1 << 20))
    # a source with more channels than the destination: BadChannelId there, the source cut off
    mismatch = {"source": {"channels": 3}, "destination": {"channels": 2}}
    with pytest.raises(BadChannelId):  # the destination's error first
        await run_loopback([block], close_on_error=True, timeout=10, **mismatch)  # type: ignore[arg-type]
    run = await run_loopback(
        [block],
        close_on_error=True,
        capture_errors=True,
        timeout=10,
        **mismatch,  # type: ignore[arg-type]
    )
    assert isinstance(run.dst_error, BadChannelId)
    assert isinstance(run.src_error, ChannelClosed)


async def test_bounded_in_time(autojump_clock: trio.testing.MockClock) -> None:
    async def never() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    with pytest.raises(trio.TooSlowError):
        await run_loopback(
            image_blocks(1 << 20),
            wrap_connect=lambda _: never,
            source={"connect_timeout": 3600},
            timeout=5,
        )
