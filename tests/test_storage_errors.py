"""Full disks and read-only directories (issue 13, "Storage errors"): a ``StorageError`` naming
the file and the errno, one line, every file of the run removed; never a SIGBUS, never a raw
ExceptionGroup or a traceback.

Each test mounts its own small tmpfs (``mount -t tmpfs -o size=4m``, root only: skipped where
mount is not permitted) and always unmounts it. ``multifd recv`` and ``multifd qemu-save`` (with
a real QEMU 7.2 source, ~3 s) as commands; the library paths that once wrote through a shared
mapping (zero fills, main-stream pages) in a child process, so that a SIGBUS would show as one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import Result
from test_receiver_files import loopback, names, pattern, save_into, send_recv

from multifd_core.errors import StorageError
from multifd_core.files import ReceivedFiles

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import qemu_harness as qh

PS = 4096


def mount_tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", os.fspath(where)],
            capture_output=True,
            timeout=10,
        )
    except (FileNotFoundError, PermissionError):
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"mount not permitted: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", os.fspath(where)], check=True, timeout=10)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs."""
    yield from mount_tmpfs(tmp_path / "fs", "size=4m")


@pytest.fixture
def read_only_fs(tmp_path: Path) -> Iterator[Path]:
    yield from mount_tmpfs(tmp_path / "ro", "size=1m,ro")


def fill_up(fs: Path, leave: int) -> None:
    """Fill ``fs`` until only ``leave`` bytes are free (a file the test made: not the
    receiver's)."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\xff" * (free - leave))


def one_line(res: Result, command: str, *words: str) -> str:
    lines = res.err.strip().splitlines()
    assert res.rc == 1 and len(lines) == 1, (res.rc, res.err)
    assert lines[0].startswith(f"multifd {command}: error: StorageError: "), res.err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_recv_on_a_full_disk(tmp_path: Path, small_fs: Path) -> None:
    """8 MiB of data into a 4 MiB tmpfs: on the main a SIGBUS, or a 51-line ExceptionGroup,
    with ``blk.part`` left behind. Now one line naming the file and ENOSPC, DIR empty."""
    src = tmp_path / "blk"
    src.write_bytes(os.urandom(8 << 20))
    out_dir = small_fs / "out"
    sent, received = send_recv(tmp_path, out_dir, [src])
    line = one_line(received, "recv", "ENOSPC", os.fspath(out_dir))
    assert ".multifd-" in line  # the file it was writing
    # the return path (on by default for send): the sender learns that recv failed
    assert sent.rc == 1 and "DestinationFailed" in sent.err, sent
    assert names(out_dir) == []


def test_recv_read_only_directory(tmp_path: Path, read_only_fs: Path) -> None:
    """A read-only DIR: on the main ``LimitExceeded: cannot allocate block``. Now EROFS."""
    src = tmp_path / "blk"
    src.write_bytes(pattern(3 * PS, 1))
    sent, received = send_recv(tmp_path, read_only_fs, [src])
    one_line(received, "recv", "EROFS", os.fspath(read_only_fs))
    assert sent.rc == 1
    assert names(read_only_fs) == []


CHILD = """
import sys
from pathlib import Path
from multifd_core import landing
from multifd_core.errors import StorageError
from multifd_core.files import ReceivedFiles

fs, how = Path(sys.argv[1]), sys.argv[2]
out = ReceivedFiles(fs / "out")
block = out.block_factory("blk", 64 * 4096, 4096)
try:
    for page in range(64):
        if how == "put_page":
            landing.put_page(block, page * 4096, bytes([7]) * 4096)
        else:
            landing.fill_page(block, page * 4096, 9)
except StorageError as exc:
    out.discard()
    print(exc)
    sys.exit(3)
sys.exit(0)
"""


@pytest.mark.parametrize("how", ["put_page", "fill_page"])
def test_page_writes_on_a_full_disk_are_storage_errors(small_fs: Path, how: str) -> None:
    """Main-stream pages and non-zero fills into a file block of a full tmpfs: on the main they
    went through the shared mapping (a SIGBUS, -7 here). Now pwrite: a StorageError, ENOSPC.
    (A zero fill only ever writes pages written before, whose blocks the file has.)"""
    fill_up(small_fs, 8 * PS)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, os.fspath(small_fs), how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 3, (child.returncode, child.stderr)
    assert "ENOSPC" in child.stdout and ".multifd-" in child.stdout, child.stdout
    assert names(small_fs / "out") == []


def test_qemu_save_device_state_on_a_full_disk(small_fs: Path) -> None:
    """The blocks fit, the device state does not: on the main a traceback (``operation
    forbidden on released memoryview``) and files under their final names. Now one
    StorageError naming the device state's file, and none of the run's files left."""
    snap = small_fs / "snap"
    snap.mkdir()
    fill_up(small_fs, 64 * PS)
    blocks = {"pc.ram": pattern(8 * PS, 2)}
    device = {"device_state": os.urandom(1 << 20)}
    with pytest.raises(StorageError, match="ENOSPC") as info:
        trio.run(loopback, blocks, save_into(snap), device)
    assert "\n" not in str(info.value) and os.fspath(snap) in str(info.value)
    assert names(snap) == []


def test_recv_commit_on_a_full_disk_leaves_nothing(small_fs: Path) -> None:
    """The blocks fit, the manifest does not: nothing renamed, nothing left."""
    out = ReceivedFiles(small_fs / "out")
    block = out.block_factory("x", PS, PS)
    fill_up(small_fs, 0)
    block.close()
    with pytest.raises(StorageError, match="ENOSPC"):
        out.commit(b'{"multifd-files": {"x": 10}, "pad": "' + b"p" * (64 * PS) + b'"}')
    out.discard()
    assert names(small_fs / "out") == []


def capture_into_a_full_disk(
    tmp_path: Path, small_fs: Path, version: str, *, return_path: bool
) -> dict[str, Any]:
    """``multifd qemu-save`` of a QEMU guest (4 MiB pattern in 64 MiB) into a full tmpfs: one
    line with ENOSPC, the snapshot directory empty; returns QEMU's final query-migrate."""
    qh.skip_unless_qemu(version)
    with qh.lab(tmp_path) as lab:
        if return_path:
            source = qh.return_path_source(lab, version, 2, "none")
        else:
            source = lab.qemu("src", *qh.pattern_loader(lab.tmp), version=version)
            source.set_multifd(2, "none")
        snap = small_fs / "snap"
        fill_up(small_fs, 512 << 10)  # the pattern is sparse: leave less than it needs
        save = lab.qemu_save(snap, channels=2, method="none", timeout=20)
        assert save.port is not None
        source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
        info: dict[str, Any] = source.wait_migration(60)
        rc = save.wait(60)
        err = save.stderr()
    one_line(Result(rc, "", err), "qemu-save", "ENOSPC", os.fspath(snap))
    assert names(snap) == []
    return info


def test_qemu_save_real_qemu_on_a_full_disk(tmp_path: Path, small_fs: Path) -> None:
    """A QEMU 7.2 guest into a full tmpfs (~3 s)."""
    info = capture_into_a_full_disk(tmp_path, small_fs, "7.2", return_path=False)
    assert info["status"] in ("completed", "failed"), info  # QEMU 7.2 waits for no answer


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_full_disk_fails_a_qemu_source_with_a_return_path(
    tmp_path: Path, small_fs: Path, version: str
) -> None:
    """With QEMU's return-path capability on, a capture that runs out of disk makes the QEMU
    source end ``failed`` (our SHUT's failure status), never ``completed`` (~3 s)."""
    info = capture_into_a_full_disk(tmp_path, small_fs, version, return_path=True)
    assert info["status"] == "failed", info
