"""Interop with a real QEMU 7.2: ``multifd qemu-save`` and ``qemu-restore`` against QEMU itself.

A QEMU source with a known pattern in its RAM (``-device loader``) migrates into ``multifd
qemu-save``; the snapshot must hold exactly the source's memory. ``multifd qemu-restore`` then
feeds a fresh QEMU destination (``-incoming defer``), with other channel counts and methods, and the
destination's memory must equal the source's. A live guest that keeps writing while it migrates
checks that pages re-sent in later rounds land in round order. The negative tests check that bad
configurations end quickly with the right error. Every QEMU is small (``-m 64M``, TCG) and every
wait is bounded; ``tests/qemu_harness.py`` has the machinery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multifd_core.image import vm_like_image
from multifd_core.qemu import load_manifest

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402
from procs import warnings_then_error  # noqa: E402

#: Loads the harness as a plugin: it registers the ``qemu`` marker and puts it on every test here.
pytest_plugins = ["qemu_harness"]
QEMU_TESTS = True

if not qh.qemu_available():
    pytest.skip(f"{qh.QEMU_BINARY} is not installed", allow_module_level=True)

PATTERN_SIZE = qh.PATTERN_SIZE
RAM_SIZE = qh.RAM_SIZE
MACHINE_TYPE = "pc-q35-7.2"
METHODS = ("none", "zlib", "zstd")
pattern = qh.pattern


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[qh.Lab]:
    with qh.lab(tmp_path) as the_lab:
        yield the_lab


def start_pattern_source(
    lab: qh.Lab, *, uuid: str | None = None, name: str = "src", version: str = "7.2"
) -> qh.Qemu:
    """A paused QEMU with the pattern at 1 MiB of its RAM."""
    loader = qh.pattern_loader(lab.tmp)
    return lab.qemu(name, *loader, *(["-uuid", uuid] if uuid else []), version=version)


def migrate_to(source: qh.Qemu, port: int) -> None:
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")


def capture(
    lab: qh.Lab, channels: int, method: str, *, uuid: str | None = None, version: str = "7.2"
) -> tuple[qh.Qemu, Path, dict[str, Any], dict[str, Any]]:
    """Migrate a pattern source into ``multifd qemu-save``; both ends must succeed.

    Returns the source (now in postmigrate), the snapshot directory, qemu-save's JSON and the
    source's final query-migrate.
    """
    source = start_pattern_source(lab, uuid=uuid, version=version)
    source.set_multifd(channels, method)
    snap = lab.tmp / f"snap-{channels}-{method}"
    save = lab.qemu_save(snap, channels=channels, method=method, uuid=uuid)
    assert save.port is not None
    migrate_to(source, save.port)
    info = source.wait_migration(60)
    assert save.wait(60) == 0, save.stderr()
    assert info["status"] == "completed", (info, source.log_tail())
    return source, snap, save.json(), info


def incoming_port(dest: qh.Qemu) -> int:
    """The port a destination listening on ``tcp:127.0.0.1:0`` got."""
    addresses = dest.query_migrate()["socket-address"]
    return int(addresses[0]["port"])


def start_destination(
    lab: qh.Lab, channels: int, method: str, *extra: str, name: str = "dst", paused: bool = True
) -> tuple[qh.Qemu, int]:
    dest = lab.qemu(name, "-incoming", "defer", *extra, paused=paused)
    dest.set_multifd(channels, method)
    dest.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return dest, incoming_port(dest)


def restore(lab: qh.Lab, snap: Path, port: int, channels: int, method: str) -> dict[str, Any]:
    run = lab.restore(snap, port, channels, method, "--json")
    assert run.wait(60) == 0, run.stderr()
    return run.json()


# --- the pattern itself ---------------------------------------------------------------------


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_each_qemu_runs(lab: qh.Lab, version: str) -> None:
    """Every QEMU the tests use is installed (CI builds 10.0's root) and answers over QMP."""
    qh.skip_unless_qemu(version)
    q = lab.qemu(f"q{version}", version=version)
    got = q.cmd("query-version")["qemu"]
    assert f"{got['major']}.{got['minor']}" == version


def test_pattern_has_every_kind_of_page() -> None:
    data = pattern()
    pages = [data[i : i + qh.PAGE] for i in range(0, len(data), qh.PAGE)]
    nonzero = [p for p in pages if any(p)]
    assert len(set(nonzero)) == len(nonzero), "a non-zero page repeats"
    assert len(pages) - len(nonzero) > 100  # zero pages
    assert any(sum(1 for b in p if b) == 1 for p in nonzero)  # single-byte pages
    assert any(p[8:16] == p[:8] and p[:8] * 512 == p for p in nonzero)  # repeated 8 bytes
    assert any(b"Lorem ipsum" in p for p in nonzero)  # text
    assert any(len(set(p)) > 200 for p in nonzero)  # random


def test_manifest_hash_of_a_sparse_snapshot_allocates_nothing() -> None:
    """sha256_file reads: through a mapping, every hole of a tmpfs file (a snapshot's zero
    pages) would be allocated as a zeroed page just to be hashed."""
    from multifd_core.qemu import HASH_CHUNK, sha256_file

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm (tmpfs)")
    path = shm / f"multifd-test-{os.getpid()}.img"
    try:
        with open(path, "wb") as f:
            f.truncate(3 * HASH_CHUNK + 8192)  # holes, and a size not a multiple of the chunk
            f.seek(HASH_CHUNK - 100)
            f.write(b"data across a chunk boundary" * 10)
        blocks = os.stat(path).st_blocks
        assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
        assert os.stat(path).st_blocks == blocks
    finally:
        path.unlink(missing_ok=True)


# --- 1. capture -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_capture(lab: qh.Lab, method: str, channels: int) -> None:
    uuid = str(uuidlib.uuid4())
    source, snap, out, info = capture(lab, channels, method, uuid=uuid)

    # our view of the migration, beside QEMU's
    assert out["status"] == "completed"
    assert out["channels"] == channels and out["compression"] == method
    assert out["machine-type"] == MACHINE_TYPE
    qram, ram = info["ram"], out["ram"]
    assert ram["duplicate"] == qram["duplicate"]  # zero pages: records on the main channel
    # QEMU 7.2 counts a packet as its header plus its pages uncompressed, so this checks that we
    # read all its page bytes and, give or take the SYNC packets its races merge into or add to
    # page-carrying ones (WIRE.md), all its packets
    headers = qram["multifd-bytes"] - ram["normal-bytes"]
    assert headers % 1344 == 0, headers
    assert abs(headers // 1344 - out["packets"]) <= 2 * channels, (headers // 1344, out["packets"])
    uncompressed = out["packets"] * 1344 + ram["normal-bytes"]
    if method == "none":
        assert ram["multifd-bytes"] == uncompressed
    else:
        assert ram["multifd-bytes"] < uncompressed
    assert ram["normal"] >= qram["normal"]  # QEMU may send a page twice
    assert ram["dirty-sync-count"] >= 2

    manifest = load_manifest(snap, verify=True)
    assert manifest["machine-type"] == MACHINE_TYPE
    assert manifest["uuid"] == uuid
    assert manifest["channels"] == channels
    assert manifest["compression"] == method
    names = [b["name"] for b in manifest["blocks"]]
    assert names[0] == "pc.ram" and "pc.bios" in names, names
    sizes = {b["name"]: b["size"] for b in manifest["blocks"]}
    assert sizes["pc.ram"] == RAM_SIZE
    assert sum(sizes.values()) == qram["total"]
    for entry in manifest["blocks"]:
        path = snap / entry["file"]
        assert path.stat().st_size == entry["size"]
        assert qh.sha256_of(path) == entry["sha256"]
    device = snap / manifest["device-state"]["file"]
    assert device.stat().st_size == manifest["device-state"]["size"] > 0
    assert qh.sha256_of(device) == manifest["device-state"]["sha256"]

    image = qh.block_image(snap, "pc.ram")
    at = qh.PATTERN_ADDR
    src_pattern = source.pmemsave(at, PATTERN_SIZE, lab.tmp / "src-pattern.mem")
    assert src_pattern == pattern()
    assert image[at : at + PATTERN_SIZE] == pattern()
    whole = source.pmemsave(0, RAM_SIZE, lab.tmp / "src.mem")
    assert qh.outside_legacy_hole(image, whole), qh.first_difference(image, whole)


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_capture_bigger_than_the_socket_buffers(lab: qh.Lab, version: str) -> None:
    """A round of pages far larger than the channels' socket buffers (regression: QEMU flushes
    the main stream after the EOS but not the section footer, so a destination that waits for the
    footer before releasing its channels deadlocks with a source blocked on them). QEMU 10.0's
    default machine syncs at MULTIFD_FLUSH records instead, flushed at once."""
    qh.skip_unless_qemu(version)
    big = bytes(vm_like_image(32 << 20, seed=8))
    path = lab.tmp / "big.bin"
    path.write_bytes(big)
    loader = f"loader,file={path},addr={qh.PATTERN_ADDR:#x},force-raw=on"
    source = lab.qemu("src", "-device", loader, version=version)
    source.set_multifd(2, "none")
    snap = lab.tmp / "snap"
    save = lab.qemu_save(snap, channels=2, method="none")
    assert save.port is not None
    migrate_to(source, save.port)
    info = source.wait_migration(30)
    assert info["status"] == "completed", info
    assert save.wait(30) == 0, save.stderr()
    assert info["ram"]["normal-bytes"] > 16 << 20
    image = qh.block_image(snap, "pc.ram")
    assert image[qh.PATTERN_ADDR : qh.PATTERN_ADDR + len(big)] == big


# --- 2. restore -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "restored"),
    [
        pytest.param((2, "zstd"), (2, "zstd"), id="zstd2-to-zstd2"),
        pytest.param((2, "zstd"), (4, "none"), id="zstd2-to-none4"),
        pytest.param((1, "none"), (2, "zlib"), id="none1-to-zlib2"),
        pytest.param((4, "zlib"), (1, "zlib"), id="zlib4-to-zlib1"),
    ],
)
def test_restore(lab: qh.Lab, saved: tuple[int, str], restored: tuple[int, str]) -> None:
    uuid = str(uuidlib.uuid4())  # a QEMU destination refuses channels with another uuid
    source, snap, _, _ = capture(lab, *saved, uuid=uuid)
    channels, method = restored
    dest, port = start_destination(lab, channels, method, "-uuid", uuid)
    out = restore(lab, snap, port, channels, method)
    assert out["status"] == "completed"
    assert out["channels"] == channels and out["compression"] == method

    info = dest.wait_migration(60)
    assert info["status"] == "completed", (info, dest.log_tail())
    assert dest.cmd("query-status")["running"] is False  # -S: it waits, RAM untouched
    at = qh.PATTERN_ADDR
    assert dest.pmemsave(at, PATTERN_SIZE, lab.tmp / "dst-pattern.mem") == pattern()
    src = source.pmemsave(0, RAM_SIZE, lab.tmp / "src.mem")
    dst = dest.pmemsave(0, RAM_SIZE, lab.tmp / "dst.mem")
    assert qh.outside_legacy_hole(src, dst), qh.first_difference(src, dst)


# --- 3. a guest that keeps writing ----------------------------------------------------------


wait_counters_running = qh.wait_counters_running
check_counters = qh.check_counters


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_live_guest(lab: qh.Lab, method: str) -> None:
    live = qh.live_capture(lab, method)
    disk, snap, counters = live.disk, live.snap, live.counters

    # The snapshot resumes: a destination that is not paused carries on counting from it.
    disk2 = lab.tmp / "boot-dst.img"
    shutil.copyfile(disk, disk2)
    dest, port = start_destination(
        lab, 2, method, "-drive", f"file={disk2},format=raw,if=ide", "-boot", "c", paused=False
    )
    restore(lab, snap, port, 2, method)
    assert dest.wait_migration(60)["status"] == "completed", dest.log_tail()
    deadline = time.monotonic() + 20
    while True:
        mem = dest.pmemsave(qh.COUNTER_FIRST_PAGE, qh.COUNTER_PAGES * qh.PAGE, lab.tmp / "d.mem")
        later = qh.read_counters(mem, qh.COUNTER_FIRST_PAGE)
        if all(a > c for a, c in zip(later, counters, strict=True)):
            break
        assert time.monotonic() < deadline, "the restored guest does not run"
        time.sleep(0.05)
    assert dest.cmd("query-status")["status"] == "running"


# --- 5. what goes wrong ---------------------------------------------------------------------


def failing_save(
    lab: qh.Lab,
    *,
    source_channels: int,
    source_method: str,
    save_channels: int,
    save_method: str,
    source_uuid: str | None = None,
    save_uuid: str | None = None,
    version: str = "7.2",
    timeout: float = 30.0,
) -> qh.MultifdProcess:
    """A misconfigured capture: qemu-save must fail within seconds and leave no snapshot
    (``timeout``: its --timeout, what ends it when every channel is refused as not its own).

    QEMU itself must not hang either, but it may well say ``completed``: a 7.2 precopy source
    gets nothing back from its destination, and this small migration fits in the socket buffers
    before qemu-save has closed them.
    """
    qh.skip_unless_qemu(version)
    source = start_pattern_source(lab, uuid=source_uuid, version=version)
    source.set_multifd(source_channels, source_method)
    snap = lab.tmp / "snap"
    save = lab.qemu_save(
        snap, channels=save_channels, method=save_method, uuid=save_uuid, timeout=timeout
    )
    assert save.port is not None
    t0 = time.monotonic()
    migrate_to(source, save.port)
    rc = save.wait(20)
    elapsed = time.monotonic() - t0
    if rc == 0 and (snap / "manifest.json").exists():
        image = qh.block_image(snap, "pc.ram")
        at = qh.PATTERN_ADDR
        same = image[at : at + PATTERN_SIZE] == pattern()
        raise AssertionError(f"qemu-save exited 0; its pc.ram equals the source's: {same}")
    assert rc == 1, save.stderr()
    assert elapsed < 10, elapsed
    assert source.wait_migration(15)["status"] in qh.FINAL_STATES
    assert not snap.exists() or not any(snap.iterdir()), sorted(snap.iterdir())
    warnings_then_error(save.stderr(), "qemu-save")  # one error line, after any warnings
    return save


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_uuid_mismatch(lab: qh.Lab, version: str) -> None:
    """QEMU's channels carry another uuid: another migration's, each refused with a warning
    line; qemu-save fails (its main channel closed, or its --timeout) naming them."""
    theirs, ours = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    save = failing_save(
        lab,
        version=version,
        source_channels=2,
        source_method="none",
        save_channels=2,
        save_method="none",
        source_uuid=theirs,
        save_uuid=ours,
        timeout=3,
    )
    warnings, error = warnings_then_error(save.stderr(), "qemu-save")
    assert warnings, save.stderr()
    for line in warnings:
        assert "refused a connection from 127.0.0.1:" in line, line
        assert "UuidMismatch: channel " in line and f"uuid {theirs} does not match {ours}" in line
    assert "other connection(s) refused (the first from 127.0.0.1:" in error, error
    assert f"uuid {theirs} does not match {ours}" in error, error


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_compression_mismatch(lab: qh.Lab, version: str) -> None:
    save = failing_save(
        lab,
        source_channels=2,
        source_method="zstd",
        save_channels=2,
        save_method="zlib",
        version=version,
    )
    assert "CompressionMismatch" in save.stderr()


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_channel_count_mismatch(lab: qh.Lab, version: str) -> None:
    """QEMU with 4 channels, qemu-save with 2: channels 2 and 3 must fail the capture."""
    save = failing_save(
        lab,
        source_channels=4,
        source_method="none",
        save_channels=2,
        save_method="none",
        version=version,
    )
    err = save.stderr()
    assert "BadChannelId" in err and "outside 0..1" in err, err


@pytest.mark.parametrize("version", qh.QEMU_VERSIONS)
def test_manifest_of_a_source_without_uuid(lab: qh.Lab, version: str) -> None:
    """Without -uuid QEMU's uuid is all zero; the manifest is plain JSON."""
    qh.skip_unless_qemu(version)
    _, snap, _, _ = capture(lab, 1, "none", version=version)
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["format"] == "multifd-qemu-save/1"
    assert manifest["stats"]["status"] == "completed"
    assert manifest["uuid"] == str(uuidlib.UUID(int=0))
    # the dialect QEMU spoke: 7.2 syncs at each EOS and sends zero records; 10.0's own machine
    # type syncs at MULTIFD_FLUSH, lists zero pages in packets, announces the switchover
    new = version != "7.2"
    assert manifest["stream"] == {
        "qemu-flush": "per-round" if new else "per-section",
        "zero-pages": "packets" if new else "records",
        "commands": ["MIG_CMD_SWITCHOVER_START"] if new else [],
    }
