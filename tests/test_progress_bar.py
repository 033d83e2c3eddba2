"""The command's progress bar: on stderr when it is a terminal (a pseudo-terminal here) or when
``--progress`` forces it, drawn from the ends' ``progress()``, ending at 100 %; never on a piped
stderr unasked, and rich is not even imported then."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from procs import finish, receiver, run, run_on_tty

from multifd_core.testing import random_files

#: rich's cursor and colour sequences, and the line erase it redraws with
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PERCENT = re.compile(r"(\d+\.\d)%")


def frames(err: str, label: str) -> list[str]:
    """The bar's successive states in ``err``, as text (each redraw starts with a carriage
    return, the last ends with a newline)."""
    text = ANSI.sub("", err)
    return [f.strip() for f in re.split(r"[\r\n]+", text) if f.strip().startswith(label)]


def percents(shown: list[str]) -> list[float]:
    found = [PERCENT.search(f) for f in shown]
    assert all(found), shown
    return [float(m.group(1)) for m in found if m]


def test_forced_bar_ends_at_100_percent() -> None:
    """``--progress`` with stderr piped: drawn all the same; the last state is round 3 at
    100 %, and no state passes it."""
    res = run("demo", "--size", "32M", "--rounds", "3", "--progress")
    assert res.rc == 0, res.err
    assert res.out.startswith("demo migration: completed")  # stdout: the summary alone
    shown = frames(res.err, "migrating")
    assert shown, res.err
    values = percents(shown)
    assert max(values) <= 100.0 and values[-1] == 100.0
    assert "round 3" in shown[-1]
    assert re.search(r"\b(\d+\.\d \w*B) of \1\b", shown[-1]), shown[-1]  # the round's plan, done


def test_bar_on_a_terminal() -> None:
    """stderr a terminal, nothing forced: the bar shows, one line of the terminal's width at
    most (redrawn in place, never wrapped), and ends at 100 %."""
    res = run_on_tty("demo", "--size", "32M", columns=90)
    assert res.rc == 0, res.err
    assert res.out.startswith("demo migration: completed")
    shown = frames(res.err, "migrating")
    assert shown and percents(shown)[-1] == 100.0
    assert max(len(f) for f in shown) <= 90, shown
    assert "\x1b[?25h" in res.err  # the cursor rich hid is shown again


def test_no_progress_on_a_terminal() -> None:
    res = run_on_tty("demo", "--size", "4M", "--no-progress")
    assert res.rc == 0, res.err
    assert res.err == ""


def test_send_and_recv_bars(tmp_path: Path) -> None:
    """send on a terminal, recv forced: both bars end at 100 %, recv's counting the bytes of
    the RAM announced (it does not know the source's plan)."""
    files = random_files(tmp_path / "in", {"a.bin": 3 << 20, "b.bin": 5 << 20 | 123}, 14)
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "2", "--progress") as (recv, port):
        sent = run_on_tty(
            "send", "--connect", f"127.0.0.1:{port}", "--channels", "2", *map(str, files)
        )
        received = finish(recv)
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    send_frames = frames(sent.err, "sending")
    assert send_frames and percents(send_frames)[-1] == 100.0
    recv_frames = frames(received.err, "receiving")
    assert recv_frames and percents(recv_frames)[-1] == 100.0
    assert max(percents(recv_frames)) <= 100.0
    assert "8.0 MiB of 8.0 MiB" in recv_frames[-1]  # both files' pages, all of them
    assert (out_dir / "a.bin").read_bytes() == files[0].read_bytes()


def test_no_bar_loads_no_rich() -> None:
    """A piped run without ``--progress`` (and ``--help``) never imports rich: its import
    costs the command's start-up only when a bar is drawn."""
    code = (
        "import sys\n"
        "from multifd_core.cli import main\n"
        "assert main(['demo', '--size', '1M']) == 0\n"
        "assert 'rich' not in sys.modules, 'rich imported'\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'rich' not in sys.modules, 'rich imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
