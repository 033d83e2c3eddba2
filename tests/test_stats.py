"""stats.py: every counter changes through one method, and both ends count alike."""

from __future__ import annotations

import ast
import dataclasses
import random
from pathlib import Path

import trio

from multifd_core import MemoryNetwork, MigrationStats, RAMBlock, open_destination, open_source
from multifd_core.image import dirty_some_pages, vm_like_image
from multifd_core.stats import ChannelStats
from multifd_core.testing import run_loopback

CORE = Path(__file__).resolve().parent.parent / "multifd_core"
COUNTERS = {f.name for f in dataclasses.fields(MigrationStats)} | {
    f.name for f in dataclasses.fields(ChannelStats)
}
#: Field names other classes also use for their own attributes (``self.channels = ...``).
SHARED_NAMES = {"role", "channels", "method", "page_size", "id", "error"}


def test_counting_methods() -> None:
    s = MigrationStats("source", 2, "none", 4096)
    c0, c1 = s.add_channel(0), s.add_channel(1)
    s.start(8192)
    s.packet(c0, normal_pages=3, header_bytes=100, payload_bytes=3 * 4096, sync=False)
    s.packet(c1, normal_pages=0, header_bytes=100, payload_bytes=0, sync=True, zero_pages=2)
    s.add_zero_pages(5)
    s.add_inline_pages(1)
    s.add_main_bytes(77)
    s.round_done()
    assert (s.status, s.total_bytes, s.rounds) == ("active", 8192, 1)
    assert (s.packets, s.normal_pages, s.zero_pages, s.inline_pages) == (2, 3, 7, 1)
    assert (s.multifd_bytes, s.payload_bytes, s.main_bytes) == (200 + 3 * 4096, 3 * 4096, 77)
    assert s.wire_bytes == 77 + 200 + 3 * 4096
    assert (c0.packets, c0.normal_pages, c0.sync_packets, c0.wire_bytes) == (1, 3, 0, 100 + 12288)
    assert (c1.packets, c1.sync_packets, c1.wire_bytes) == (1, 1, 100)
    assert s.per_channel == [c0, c1]
    s.finish("completed")
    assert s.as_dict()["ram"]["dirty-sync-count"] == 1


def assigned_counters(path: Path) -> list[str]:
    """``x.FIELD = ...`` / ``x.FIELD += ...`` of a stats field in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AugAssign | ast.AnnAssign)
            else []
        )
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr in COUNTERS - SHARED_NAMES:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(t)}")
    return found


def test_no_module_but_stats_assigns_a_counter() -> None:
    found = [
        hit
        for p in sorted(CORE.rglob("*.py"))
        if p.name != "stats.py"
        for hit in assigned_counters(p)
    ]
    assert not found, found


def test_the_check_sees_an_assignment(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f(stats):\n    stats.rounds += 1\n    stats.main_bytes = 3\n")
    assert assigned_counters(f) == ["m.py:2: stats.rounds", "m.py:3: stats.main_bytes"]


async def test_both_ends_count_the_same_rounds() -> None:
    """A round is one pass over the dirty pages ending in a sync; the setup's sync is not one."""
    memory = vm_like_image(2 << 20, seed=4)
    block = RAMBlock("ram", memory)
    net = MemoryNetwork()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            done: list[MigrationStats] = []

            async def destination() -> None:
                async with open_destination(net.accept, channels=2) as dst:
                    done.append(await dst.wait())

            nursery.start_soon(destination)
            async with open_source([block], net.connect, channels=2) as src:
                rng = random.Random(4)
                for generation in range(2):
                    await src.send_round()
                    for offset in dirty_some_pages(memory, 4096, 10, rng, generation):
                        block.mark_dirty(offset, 4096)
                stats = await src.complete()
    assert stats.rounds == done[0].rounds == 3
    assert stats.as_dict()["ram"]["dirty-sync-count"] == 3
    assert done[0].zero_pages == stats.zero_pages and done[0].normal_pages == stats.normal_pages
    assert done[0].packets == stats.packets and done[0].multifd_bytes == stats.multifd_bytes


async def test_cpu_seconds_of_the_process_and_of_the_event_loop() -> None:
    """Both ends say how much CPU their process and their event loop's thread spent, from
    opening to the end; the loop's share of a migration that copies pages is real work."""
    block = RAMBlock("ram", bytearray(random.Random(5).randbytes(8 << 20)), 4096)
    run = await run_loopback([block], transport="tcp", timeout=30)
    for stats in (run.src_stats, run.dst_stats):
        assert stats is not None and stats.cpu_seconds is not None
        process, loop = stats.cpu_seconds
        assert loop is not None and 0 < loop <= process + 0.01
        shown = stats.as_dict()["cpu-seconds"]
        assert shown == {"process": round(process, 4), "event-loop": round(loop, 4)}


def test_cpu_seconds_of_a_loop_finished_from_another_thread_are_unknown() -> None:
    import threading

    stats = MigrationStats("source", 1, "none", 4096)
    assert "cpu-seconds" not in stats.as_dict()  # not finished
    worker = threading.Thread(target=stats.finish, args=("failed",))
    worker.start()
    worker.join()
    assert stats.cpu_seconds is not None and stats.cpu_seconds[1] is None
    assert stats.as_dict()["cpu-seconds"]["event-loop"] is None
