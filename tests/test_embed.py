"""The typed example program (examples/embed/embed.py): it runs, ``mypy --strict`` accepts it,
and ``mypy --strict`` refuses a program that misuses the API (a wrong acceptor, a misspelt or
mistyped option, a status that does not exist)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from test_lint import ROOT, tool
from test_readme import block_after

EXAMPLE = ROOT / "examples" / "embed" / "embed.py"
#: seconds the example or one mypy run may take
TIMEOUT = 240


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def test_the_example_migrates_then_cancels() -> None:
    proc = run(sys.executable, str(EXAMPLE), "--size", "4", "--rounds", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # 4 MiB: 1024 pages, all sent by round 1; the vCPU thread writes 256 beside each of the
    # first 2 rounds (how many land in the round beside them or the next: a race, by design)
    assert lines[0].startswith("round 1: 1024 pages sent")
    assert re.fullmatch(r"round 2: \d+ pages sent, \d+ dirty for the next", lines[1])
    assert re.fullmatch(r"migrated: completed, 3 rounds, \d+ pages", lines[2])
    assert lines[3] == "cancelled: source cancelled; destination ChannelClosed"
    assert proc.stderr == ""  # no warning (a plugin shadowed by a directory, a leak, ...)


def test_the_example_passes_mypy_strict() -> None:
    proc = run(tool("mypy"), "--strict", str(EXAMPLE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


MISUSE = """\
import trio
import multifd_core as mfd


async def misuse(ram: mfd.RAMBlock, connect: mfd.Connector) -> None:
    async with mfd.open_destination(lambda: 3):
        pass
    await mfd.migrate([ram], connect, chanels=4)
    await mfd.migrate([ram], connect, channels="4")
    async with mfd.open_source([ram], connect, idle_timeuot=5.0):
        pass
    await mfd.receive(mfd.MemoryNetwork().accept, page_size=4096, verfy=True)
    stats = await mfd.migrate([ram], connect, rounds=2)
    if stats.status == "complete":
        pass
    stats.finish("done")
"""
#: what mypy says about each line of MISUSE (its line number, a piece of the message)
REFUSALS = [
    (6, 'Argument 1 to "open_destination" has incompatible type'),
    (8, 'Unexpected keyword argument "chanels" for "migrate"'),
    (9, 'Argument "channels" to "migrate" has incompatible type "str"; expected "int"'),
    (10, 'Unexpected keyword argument "idle_timeuot" for "open_source"'),
    (12, 'Unexpected keyword argument "verfy" for "receive"'),
    (14, "Non-overlapping equality check"),
    (16, 'Argument 1 to "finish" of "MigrationStats" has incompatible type "Literal[\'done\']"'),
]


def test_mypy_strict_refuses_misuse(tmp_path: Path) -> None:
    """Each misuse is an error of its own line; the same program without them passes."""
    bad = tmp_path / "misuse.py"
    bad.write_text(MISUSE)
    proc = run(tool("mypy"), "--strict", str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if ": error: " in line]
    for lineno, text in REFUSALS:
        assert any(f"misuse.py:{lineno}: error: " in e and text in e for e in errors), (
            lineno,
            text,
            proc.stdout,
        )
    lines = {int(e.split(":")[1]) for e in errors}
    assert lines == {n for n, _ in REFUSALS}, proc.stdout  # nothing else is refused

    good = tmp_path / "good.py"
    fixed = (
        MISUSE.replace("lambda: 3", "mfd.MemoryNetwork().accept")
        .replace("chanels", "channels")
        .replace('channels="4"', "channels=4")
        .replace("idle_timeuot", "idle_timeout")
        .replace("verfy", "verify")
        .replace('"complete"', '"completed"')
        .replace('"done"', '"failed"')
    )
    good.write_text(fixed)
    proc = run(tool("mypy"), "--strict", str(good))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_readme_example_passes_mypy_strict(tmp_path: Path) -> None:
    example = tmp_path / "readme_example.py"
    example.write_text(block_after("example", "python"))
    proc = run(tool("mypy"), "--strict", str(example))
    assert proc.returncode == 0, proc.stdout + proc.stderr
