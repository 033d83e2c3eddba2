"""The files ``multifd recv`` and ``multifd qemu-save`` make: a receiver that cannot be turned
against its host (issue 13, "Files" and the sizes after EOF).

In a scratch DIR, every attack seen on the main before: a symlink at a block's temporary or
final name pointing outside DIR, blocks ``a.part`` and ``a``, a user's own ``DIR/notes.part``,
a DIR replaced by a symlink while a migration runs, qemu-save's image / manifest / device-state
names as symlinks, sizes after EOF of 8 TiB, negative or bad for a second file. Library level
through ``MemoryNetwork`` (milliseconds each), the command over real TCP (about 1 s each).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import Result, finish, receiver, run

from multifd_core import Acceptor, MemoryNetwork, RAMBlock, open_destination, open_source
from multifd_core.errors import ProtocolError, StorageError
from multifd_core.files import MANIFEST, ReceivedFiles
from multifd_core.qemu import DEVICE_STATE, qemu_save

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import qemu_harness as qh

PS = 4096
TEMPORARY = re.compile(r"\.multifd-[0-9a-f]{16}\.part")
OUTSIDE = b"a file outside DIR, never to change\n"


def pattern(size: int, seed: int) -> bytes:
    return bytes((seed * 7 + i // 3) % 251 for i in range(size))


def outside(tmp_path: Path, name: str = "outside") -> Path:
    victim = tmp_path / name
    victim.write_bytes(OUTSIDE)
    return victim


Receive = Callable[[Acceptor], Awaitable[Any]]


async def loopback(
    blocks: dict[str, bytes], receive: Receive, source: dict[str, Any] | None = None
) -> tuple[Any, BaseException | None]:
    """Migrate ``blocks`` over a MemoryNetwork into ``receive(accept)``, the source with the
    options ``source``; returns what receive returned and the source's error (None when it
    completed). The receiver's error is raised, alone."""
    net = MemoryNetwork()
    ram = [RAMBlock(name, bytearray(data), PS) for name, data in blocks.items()]
    got: list[Any] = []
    failed: list[BaseException] = []
    refused: list[BaseException] = []

    async def send() -> None:
        try:
            async with open_source(ram, net.connect, channels=2, **(source or {})) as src:
                await src.complete()
        except Exception as exc:  # the receiver refused: the source fails too
            failed.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                got.append(await receive(net.accept))
            except Exception as exc:
                refused.append(exc)
                nursery.cancel_scope.cancel()
    if refused:
        raise refused[0]
    return got[0], failed[0] if failed else None


def recv_into(out: ReceivedFiles) -> Receive:
    """A ``multifd recv`` in the library: the destination, then commit or discard."""

    async def receive(accept: Acceptor) -> dict[str, Any]:
        try:
            async with open_destination(accept, channels=2, block_factory=out.block_factory) as dst:
                await dst.wait()
            return out.commit(dst.vmdesc)
        except BaseException:
            out.discard()
            raise

    return receive


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- recv: symlinks, collisions, files of others ------------------------------------------


def test_a_symlinked_part_file_is_never_followed(tmp_path: Path) -> None:
    """``DIR/x.part`` a symlink to a file outside DIR: on the main, announcing block ``x``
    truncated that file, and on completion filled it with the migrated data."""
    victim = outside(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "x.part").symlink_to(victim)
    data = pattern(3 * PS, 1)
    trio.run(loopback, {"x": data}, recv_into(ReceivedFiles(out_dir)))
    assert victim.read_bytes() == OUTSIDE
    assert (out_dir / "x").read_bytes() == data
    assert (out_dir / "x.part").is_symlink()  # not ours: left alone
    assert names(out_dir) == [MANIFEST, "x", "x.part"]


def test_a_users_own_part_file_is_never_touched(tmp_path: Path) -> None:
    """A user's ``DIR/notes.part``: on the main, a failed migration of block ``notes`` resized
    and then deleted it."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.part").write_bytes(OUTSIDE)
    out = ReceivedFiles(out_dir)
    out.block_factory("notes", 4 * PS, PS)
    out.block_factory("more", PS, PS)
    out.discard()  # the migration failed
    assert names(out_dir) == ["notes.part"]
    assert (out_dir / "notes.part").read_bytes() == OUTSIDE


def test_temporary_names_are_the_receivers_own(tmp_path: Path) -> None:
    """Never derived from a block name, never a block's final name (those never start with a
    dot), made with O_EXCL: blocks ``a.part`` and ``a`` in any order keep both files."""
    out = ReceivedFiles(tmp_path)
    for name in ("a.part", "a", "b"):
        out.block_factory(name, PS, PS)
        assert all(TEMPORARY.fullmatch(n) for n in names(tmp_path))
    temporary = {got.part for got in out.received.values()}
    assert len(temporary) == 3 and not temporary & {"a", "a.part", "b"}
    out.discard()
    assert names(tmp_path) == []


def test_send_a_part_and_a(tmp_path: Path) -> None:
    """``multifd send a.part a`` over TCP: both files arrive, each with its own data."""
    src = tmp_path / "src"
    src.mkdir()
    data = {"a.part": pattern(2 * PS + 5, 2), "a": pattern(PS, 3)}
    for name, content in data.items():
        (src / name).write_bytes(content)
    out_dir = tmp_path / "out"
    sent, received = send_recv(tmp_path, out_dir, [src / "a.part", src / "a"])
    assert (sent.rc, received.rc) == (0, 0), (sent.err, received.err)
    assert names(out_dir) == [MANIFEST, "a", "a.part"]
    for name, content in data.items():
        assert (out_dir / name).read_bytes() == content


def send_recv(
    tmp_path: Path, out_dir: Path, files: list[Path], *recv_args: str
) -> tuple[Result, Result]:
    ready = tmp_path / f"ready-{len(list(tmp_path.glob('ready-*')))}"
    with receiver(ready, out_dir, "--channels", "2", *recv_args) as (recv, port):
        sent = run("send", "--connect", f"127.0.0.1:{port}", "--channels", "2", *map(str, files))
        received = finish(recv)
    return sent, received


def one_line(res: Result, command: str) -> str:
    lines = res.err.strip().splitlines()
    assert res.rc == 1 and len(lines) == 1, res.err
    assert lines[0].startswith(f"multifd {command}: error: "), res.err
    return lines[0]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_existing_final_name_is_refused_unless_overwrite(tmp_path: Path, kind: str) -> None:
    """``DIR/x`` exists (a user's file, or a symlink out of DIR): refused with one line before
    any data moves, nothing changed; with ``--overwrite`` the name (never what it points to) is
    replaced by the migrated file."""
    victim = outside(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if kind == "file":
        (out_dir / "x").write_bytes(OUTSIDE)
    else:
        (out_dir / "x").symlink_to(victim)
    src = tmp_path / "x"
    src.write_bytes(pattern(3 * PS, 4))
    sent, received = send_recv(tmp_path, out_dir, [src])
    del sent  # may exit 0: it had sent everything before recv refused (no return path yet)
    line = one_line(received, "recv")
    assert "out/x" in line and "EEXIST" in line, line
    assert names(out_dir) == ["x"] and (out_dir / "x").read_bytes() == OUTSIDE
    sent, received = send_recv(tmp_path, out_dir, [src], "--overwrite", "--fsync")
    assert (sent.rc, received.rc) == (0, 0), (sent.err, received.err)
    assert not (out_dir / "x").is_symlink()
    assert (out_dir / "x").read_bytes() == src.read_bytes()
    assert victim.read_bytes() == OUTSIDE


def test_a_directory_replaced_meanwhile_is_not_followed(tmp_path: Path) -> None:
    """DIR moved away and replaced by a symlink to another directory after the receiver opened
    it: every file still goes into the directory it opened, none into the other one."""
    out_dir = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = ReceivedFiles(out_dir)
    block = out.block_factory("x", PS, PS)
    out_dir.rename(tmp_path / "moved")
    out_dir.symlink_to(elsewhere)
    out.block_factory("y", PS, PS)
    block.close()
    out.commit(None)
    assert names(elsewhere) == []
    assert names(tmp_path / "moved") == [MANIFEST, "x", "y"]


# --- recv: sizes after EOF ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        {"a": 8 << 40, "b": PS},  # 8 TiB: on the main an 8 TiB sparse file, exit 0
        {"a": -1, "b": PS},  # on the main a bare [Errno 22]
        {"a": 10, "b": 8 << 40},  # a bad second size: on the main "a" was renamed already
        {"a": 10, "b": -5},
        {"a": 10, "b": 0},
        {"a": 10, "b": PS + 1},
        {"a": 10, "b": True},
        {"a": 10, "b": 10.5},
        {"a": 10, "b": "10"},
    ],
)
def test_a_bad_size_after_eof_leaves_nothing(tmp_path: Path, sizes: dict[str, Any]) -> None:
    out = ReceivedFiles(tmp_path)
    out.block_factory("a", PS, PS)
    out.block_factory("b", PS, PS)
    with pytest.raises(ProtocolError):
        out.commit(json.dumps({"multifd-files": sizes}).encode())
    assert all(TEMPORARY.fullmatch(n) for n in names(tmp_path))  # nothing renamed
    out.discard()
    assert names(tmp_path) == []


def test_a_size_after_eof_beyond_max_size_is_refused(tmp_path: Path) -> None:
    out = ReceivedFiles(tmp_path)
    out.max_size = 100
    out.block_factory("a", PS, PS)
    with pytest.raises(ProtocolError, match="file size of 101"):
        out.commit(json.dumps({"multifd-files": {"a": 101}}).encode())
    out.discard()
    assert names(tmp_path) == []


def test_sizes_after_eof_end_to_end(tmp_path: Path) -> None:
    """The description of a real source (library), one size too big for its block: nothing
    left in DIR, the error names the block."""
    out_dir = tmp_path / "out"
    description = json.dumps({"multifd-files": {"a": 10, "b": 8 << 40}}).encode()
    blocks = {"a": pattern(PS, 5), "b": pattern(PS, 6)}
    with pytest.raises(ProtocolError, match="'b'"):
        trio.run(
            lambda: loopback(
                blocks, recv_into(ReceivedFiles(out_dir)), {"description": description}
            )
        )
    assert names(out_dir) == []


# --- qemu-save ------------------------------------------------------------------------------


def save_into(directory: Path, **kwargs: Any) -> Receive:
    async def receive(accept: Acceptor) -> Any:
        return await qemu_save(accept, directory, channels=2, **kwargs)

    return receive


@pytest.mark.parametrize("name", ["block-00.img", "manifest.json", DEVICE_STATE])
def test_qemu_save_never_follows_a_symlink(tmp_path: Path, name: str) -> None:
    """qemu-save's image, manifest and device-state names as symlinks out of DIR: on the main,
    all three outside files were overwritten, exit 0. Now refused (the image's when the block
    list arrives, the others before anything connects); with overwrite the link is replaced."""
    victim = outside(tmp_path)
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / name).symlink_to(victim)
    blocks = {"pc.ram": pattern(8 * PS, 7)}
    with pytest.raises(StorageError, match=f"{name}.*EEXIST"):
        trio.run(loopback, blocks, save_into(snap))
    assert names(snap) == [name] and victim.read_bytes() == OUTSIDE
    result, failed = trio.run(loopback, blocks, save_into(snap, overwrite=True))
    assert failed is None
    assert not (snap / name).is_symlink() and victim.read_bytes() == OUTSIDE
    assert (snap / "block-00.img").read_bytes() == blocks["pc.ram"]
    assert names(snap) == ["block-00.img", DEVICE_STATE, "manifest.json"]
    assert result.manifest["blocks"][0]["file"] == "block-00.img"


def test_qemu_save_device_state_name_taken_by_a_directory(tmp_path: Path) -> None:
    """On the main: a traceback (``operation forbidden on released memoryview``) after the
    blocks were written, files left under their final names. Now one StorageError, before any
    data moves; with overwrite, the rename fails (EISDIR) and every file of the run goes."""
    snap = tmp_path / "snap"
    (snap / DEVICE_STATE).mkdir(parents=True)
    blocks = {"pc.ram": pattern(8 * PS, 8)}
    with pytest.raises(StorageError, match="EEXIST"):
        trio.run(loopback, blocks, save_into(snap))
    with pytest.raises(StorageError, match=f"{DEVICE_STATE}.*EISDIR") as info:
        trio.run(loopback, blocks, save_into(snap, overwrite=True))
    assert "\n" not in str(info.value)
    assert names(snap) == [DEVICE_STATE] and (snap / DEVICE_STATE).is_dir()


def test_a_block_that_cannot_be_mapped_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmap (or fd) limits hit after the file was made: on the main a 16 GiB sparse ``.part``
    stayed. Now the file goes at once, and the error is the mapping's."""

    class NoMapping(mmap.mmap):  # still a type: isinstance(x, mmap.mmap) keeps working
        def __new__(cls, *args: Any, **kwargs: Any) -> NoMapping:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    out = ReceivedFiles(tmp_path)
    out.block_factory("kept", PS, PS)
    monkeypatch.setattr(mmap, "mmap", NoMapping)
    with pytest.raises(OSError, match="Cannot allocate"):
        out.block_factory("big", 16 << 30, PS)
    assert len(names(tmp_path)) == 1  # "kept"'s temporary file only
    out.discard()
    assert names(tmp_path) == []


def test_qemu_save_of_a_real_qemu_never_follows_a_symlinked_image(tmp_path: Path) -> None:
    """``multifd qemu-save`` of a QEMU 7.2 guest, ``block-00.img`` a symlink out of the
    snapshot directory: refused in one line when the block list arrives (the outside file
    unchanged, nothing else made); on the main it was overwritten, exit 0 (~2 s)."""
    qh.skip_unless_qemu("7.2")
    victim = outside(tmp_path)
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "block-00.img").symlink_to(victim)
    with qh.lab(tmp_path) as lab:
        source = lab.qemu("src", *qh.pattern_loader(lab.tmp))
        source.set_multifd(2, "none")
        save = lab.qemu_save(snap, channels=2, method="none", timeout=20)
        source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
        source.wait_migration(60)
        res = Result(save.wait(60), "", save.stderr())
    line = one_line(res, "qemu-save")
    assert "block-00.img" in line and "EEXIST" in line, line
    assert names(snap) == ["block-00.img"] and victim.read_bytes() == OUTSIDE


def test_a_final_name_made_meanwhile_is_still_never_replaced(tmp_path: Path) -> None:
    """``DIR/x`` made by someone else after block ``x`` was announced: the rename does not
    replace it (renameat2 RENAME_NOREPLACE), the run's files go, the other file stays."""
    out = ReceivedFiles(tmp_path)
    out.block_factory("y", PS, PS).close()
    out.block_factory("x", PS, PS).close()
    (tmp_path / "x").write_bytes(OUTSIDE)
    with pytest.raises(StorageError, match="EEXIST"):
        out.commit(None)
    out.discard()
    assert names(tmp_path) == ["x"] and (tmp_path / "x").read_bytes() == OUTSIDE


def test_qemu_save_command_refuses_an_existing_snapshot_unless_overwrite(tmp_path: Path) -> None:
    """`multifd qemu-save` refuses a DIR holding a manifest before it listens; with
    --overwrite --fsync it gets as far as waiting for QEMU (here: its --timeout of 1 s)."""
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "manifest.json").write_text("the user's\n")
    argv = ("qemu-save", "--listen", "127.0.0.1:0", "--output", str(snap), "--timeout", "1")
    refused = run(*argv)
    assert refused.rc == 1 and "StorageError" in refused.err and "EEXIST" in refused.err
    assert len(refused.err.strip().splitlines()) == 1, refused.err
    waited = run(*argv, "--overwrite", "--fsync")
    assert waited.rc == 1 and "MigrationTimeout" in waited.err, waited.err
    assert (snap / "manifest.json").read_text() == "the user's\n"  # nothing replaced: no data
    assert sorted(os.listdir(snap)) == ["manifest.json"]
