"""``multifd demo`` with its destination in a child process (cli/demodst.py): the digests it
reports are checked (a corrupt copy fails the demo), its errors reach the demo as one line, and
it never outlives the demo (an error, Ctrl-C, the demo killed outright). Real processes, real
loopback TCP; every process is bounded and killed by pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from procs import MULTIFD, TIMEOUT, finish, one_line_error, plugin_site, run

CHILD = "multifd_core.cli.demodst"
#: a demo that runs long enough to be caught in the middle (it is ended before it completes)
LONG_DEMO = ("demo", "--size", "16M", "--rounds", "100000")


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still its children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie left to a parent that does not reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def listening(pid: int) -> bool:
    """``pid`` has a listening TCP socket (its fds against the kernel's table of them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                return True
    return False


def wait_until(condition: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)


@contextmanager
def demo_with_child(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``multifd ARGS`` in a session of its own, once its destination process listens: both
    pids.
    Whatever the test did, both are killed by pid at the end."""
    proc = subprocess.Popen(
        [*MULTIFD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child: list[int] = []
    try:

        def started() -> bool:
            assert proc.poll() is None, finish(proc)
            child[:] = [c for c in children(proc.pid) if CHILD in cmdline(c)]
            return bool(child)

        wait_until(started, "the destination process started")
        wait_until(lambda: listening(child[0]), "the destination process listens")
        yield proc, child[0]
    finally:
        for pid in (proc.pid, *child):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)


def test_the_destination_runs_in_a_child_process_that_ctrl_c_ends() -> None:
    """Ctrl-C to the demo alone (not to its process group): it ends its child (SIGTERM)."""
    with demo_with_child(*LONG_DEMO) as (proc, child):
        argv = cmdline(child)  # the demo's interpreter: python or python3 of the same venv
        assert os.path.realpath(argv[0]) == os.path.realpath(sys.executable)
        assert argv[1:4] == ["-P", "-m", CHILD]
        time.sleep(0.5)  # in the middle of the migration
        os.kill(proc.pid, signal.SIGINT)
        res = finish(proc)
        assert res.rc != 0 and "completed" not in res.out
        wait_until(lambda: not alive(child), "the child ended")


def test_ctrl_c_on_the_terminal_ends_both_quietly() -> None:
    """Ctrl-C on a terminal signals the process group: the child exits without a word, the
    demo says it was interrupted."""
    with demo_with_child(*LONG_DEMO) as (proc, child):
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        res = finish(proc)
        assert (res.rc, res.err) == (130, "multifd demo: interrupted\n")
        wait_until(lambda: not alive(child), "the child ended")


def test_a_demo_killed_outright_leaves_no_child() -> None:
    """SIGKILL gives the demo no chance to end its child: the child sees its stdin close."""
    with demo_with_child(*LONG_DEMO) as (proc, child):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
        wait_until(lambda: not alive(child), "the orphaned child ended")


def test_a_child_that_dies_is_one_line() -> None:
    with demo_with_child(*LONG_DEMO) as (proc, child):
        time.sleep(0.5)
        os.kill(child, signal.SIGKILL)
        res = finish(proc)
        assert res.rc == 1
        line = one_line_error(res, "demo")
        assert "DestinationFailed: the destination process failed (killed by SIGKILL)" in line


def test_a_corrupt_copy_is_not_verified(tmp_path: Path) -> None:
    """flipbyte flips a byte of every packet as it lands; without packet checksums only the
    digests the child reports can tell, and the demo fails naming each block that differs."""
    env = plugin_site(tmp_path, "broken_methods")
    res = run("demo", "--size", "4M", "--compression", "flipbyte", "--no-integrity", env=env)
    assert res.rc == 1 and res.out == ""
    line = one_line_error(res, "demo")
    assert "IncompleteMigration: destination differs from the source after migration" in line
    assert "pc.ram (xxh3-128 " in line and "pc.bios (xxh3-128 " in line
    ok = run("demo", "--size", "4M", "--compression", "none", "--no-integrity", "--json", env=env)
    assert ok.rc == 0, ok.err
    out = json.loads(ok.out)
    assert out["verified"] is True
    assert out["integrity"]["checksum-packets"] == 0
    assert out["destination"]["integrity"]["checksum-packets"] == 0


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--compression", "flipbyte"], "the destination failed: IntegrityError: "),
        (["--compression", "raising", "-o", "fail=recv_pages"], "recv_pages raised ValueError"),
        (["--compression", "raising", "-o", "fail=recv_setup"], "recv_setup raised ValueError"),
    ],
)
def test_the_destinations_error_is_one_line(tmp_path: Path, args: list[str], said: str) -> None:
    env = plugin_site(tmp_path, "broken_methods")
    res = run("demo", "--size", "4M", *args, env=env)
    assert res.rc == 1 and res.out == ""
    line = one_line_error(res, "demo")
    assert line.startswith("multifd demo: error: DestinationFailed: the destination failed: ")
    assert said in line


def test_the_sources_own_error_stays_the_sources(tmp_path: Path) -> None:
    env = plugin_site(tmp_path, "broken_methods")
    res = run(
        "demo", "--size", "4M", "--compression", "raising", "-o", "fail=send_prepare", env=env
    )
    assert res.rc == 1
    assert "error: MethodError: method 'raising'" in one_line_error(res, "demo")


def child_process(config: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", CHILD, config],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kwargs,  # type: ignore[call-overload]
    )


def test_the_child_ends_when_its_stdin_closes() -> None:
    """Its stdin at its end from the start: it listened, then ended, with nothing to report."""
    from multifd_core.cli.parser import build_parser

    config = json.dumps(vars(build_parser().parse_args(["demo"])))
    proc = child_process(config, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert isinstance(json.loads(line)["port"], int)
    assert proc.stderr == ""


def test_the_child_reports_a_bad_config_on_one_line() -> None:
    proc = child_process('{"channels": 2}', input="")
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["error"].startswith("AttributeError: ")  # no traceback
    assert proc.stderr == ""
