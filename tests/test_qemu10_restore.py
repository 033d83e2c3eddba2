"""``multifd qemu-restore`` into a real QEMU 10.0, in the dialect its machine type expects.

Captures come from ``multifd qemu-save`` of a QEMU 7.2 source, and of a QEMU 10.0 source with
its own defaults for the machine type (per-round MULTIFD_FLUSH, zero pages in packets from 9.0,
MIG_CMD_SWITCHOVER_START from 10.0). Restores use another channel count and method than the
capture, and:

- a 7.2 capture into QEMU 10.0 started with ``-machine pc-q35-7.2`` / ``pc-i440fx-7.2``: the
  per-section sync, zero pages as main-stream records (or sent whole);
- a 10.0 capture (machine type pc-q35-10.0, pc-i440fx-9.2) into QEMU 10.0: a MULTIFD_FLUSH record
  per round, zero pages in the packets' zero-page list (QEMU's default there), or as records;
- a restore it cannot serve (zero pages in packets for a 7.2 machine type) exits 1 with the
  reason on one line and never connects.

RAM equal to the source's (pmemsave), and a live guest (the boot sector of qemu_harness) goes on
counting on the destination. Pairwise, small guests (-m 64M, TCG), bounded waits. Costs, measured
on 2 cores: each pattern case 2-4 s, each live case 3-6 s, the refusal 1 s; ~25 s in all.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import socket
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402
import test_qemu as tq  # noqa: E402

pytest_plugins = ["qemu_harness"]
QEMU_TESTS = True


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[qh.Lab]:
    qh.skip_unless_qemu("7.2")
    qh.skip_unless_qemu("10.0")
    with qh.lab(tmp_path) as the_lab:
        yield the_lab


def save_from(
    lab: qh.Lab, source: qh.Qemu, channels: int, method: str, uuid: str, **params: Any
) -> Path:
    """Migrate ``source`` into ``multifd qemu-save``; both must succeed. The snapshot's path."""
    source.set_multifd(channels, method, **params)
    snap = lab.tmp / "snap"
    save = lab.qemu_save(snap, channels=channels, method=method, uuid=uuid)
    assert save.port is not None
    tq.migrate_to(source, save.port)
    info = source.wait_migration(60)
    assert save.wait(60) == 0, save.stderr()
    assert info["status"] == "completed", (info, source.log_tail())
    return snap


def qemu10_destination(
    lab: qh.Lab, machine: str, channels: int, method: str, uuid: str, *extra: str, **params: Any
) -> tuple[qh.Qemu, int]:
    """A QEMU 10.0 waiting on ``tcp:127.0.0.1:0`` with multifd set; its port."""
    dest = lab.qemu(
        "dst", "-machine", machine, "-uuid", uuid, "-incoming", "defer", *extra, version="10.0"
    )
    dest.set_multifd(channels, method, **params)
    dest.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return dest, tq.incoming_port(dest)


def run_restore(
    lab: qh.Lab, snap: Path, port: int, channels: int, method: str, zero: str | None
) -> qh.MultifdProcess:
    args = ["qemu-restore", os.fspath(snap), "--connect", f"127.0.0.1:{port}", "--json"]
    args += ["--channels", str(channels), "--compression", method]
    if zero is not None:
        args += ["--zero-page-detection", zero]
    return lab.multifd(*args)


def restored(lab: qh.Lab, snap: Path, dest: qh.Qemu, port: int, zero: str | None) -> dict[str, Any]:
    """Restore ``snap`` into ``dest`` with its multifd settings; the restore's JSON."""
    params = dest.cmd("query-migrate-parameters")
    channels, method = params["multifd-channels"], params["multifd-compression"]
    run = run_restore(lab, snap, port, channels, method, zero)
    assert run.wait(60) == 0, run.stderr()
    info = dest.wait_migration(60)
    assert info["status"] == "completed", (info, dest.log_tail())
    out = run.json()
    assert out["status"] == "completed"
    assert out["channels"] == channels and out["compression"] == method
    return out


def check_zero_pages(out: dict[str, Any], zero: str, device_state: int) -> None:
    """Where the zero pages went: records (legacy), packets (multifd), nowhere (none)."""
    ram = out["ram"]
    if zero == "none":
        assert ram["duplicate"] == 0
        return
    assert ram["duplicate"] > 0
    # a zero record is 9 bytes of the main stream; in packets they cost it nothing
    records = ram["main-bytes"] - device_state
    assert (records >= 9 * ram["duplicate"]) == (zero == "legacy"), ram


# (source QEMU, machine type, capture channels/method, restore channels/method, zero pages)
PATTERN_CASES = [
    pytest.param("7.2", "pc-q35-7.2", (2, "zstd"), (4, "none"), None, id="72-q35-zstd2-none4"),
    pytest.param("7.2", "pc-i440fx-7.2", (1, "none"), (2, "zlib"), "none", id="72-pc-none1-zlib2"),
    pytest.param("10.0", "pc-q35-10.0", (2, "zstd"), (4, "zlib"), None, id="10-q35-zstd2-zlib4"),
    pytest.param(
        "10.0", "pc-i440fx-9.2", (4, "none"), (1, "zstd"), "legacy", id="10-pc-none4-zstd1"
    ),
]


@pytest.mark.parametrize(("version", "machine", "saved", "into", "zero"), PATTERN_CASES)
def test_restore_into_qemu10(
    lab: qh.Lab,
    version: str,
    machine: str,
    saved: tuple[int, str],
    into: tuple[int, str],
    zero: str | None,
) -> None:
    uuid = str(uuidlib.uuid4())
    loader = f"loader,file={qh.pattern_file(lab.tmp)},addr={qh.PATTERN_ADDR:#x},force-raw=on"
    source = lab.qemu(
        "src", "-machine", machine, "-device", loader, "-uuid", uuid,
        version=version,
    )  # fmt: skip
    snap = save_from(lab, source, *saved, uuid)
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["machine-type"] == machine
    dest, port = qemu10_destination(lab, machine, *into, uuid)
    out = restored(lab, snap, dest, port, zero)
    expect = zero or ("legacy" if machine.endswith("7.2") else "multifd")
    check_zero_pages(out, expect, manifest["device-state"]["size"])
    assert dest.cmd("query-status")["running"] is False  # -S: it waits, RAM untouched
    src = source.pmemsave(0, qh.RAM_SIZE, lab.tmp / "src.mem")
    dst = dest.pmemsave(0, qh.RAM_SIZE, lab.tmp / "dst.mem")
    assert dst[qh.PATTERN_ADDR : qh.PATTERN_ADDR + qh.PATTERN_SIZE] == qh.pattern()
    assert qh.outside_legacy_hole(src, dst), qh.first_difference(src, dst)


@pytest.mark.parametrize(
    ("version", "machine", "zero"),
    [("7.2", "pc-q35-7.2", "legacy"), ("10.0", "pc-q35-9.2", "multifd")],
    ids=["72-into-10-q35-7.2", "10-into-10-q35-9.2"],
)
def test_live_guest_runs_on_in_qemu10(lab: qh.Lab, version: str, machine: str, zero: str) -> None:
    """A guest captured while it runs goes on counting from the snapshot in QEMU 10.0."""
    disk = qh.boot_disk(lab.tmp / "boot.img")
    uuid = str(uuidlib.uuid4())
    drive = ("-drive", f"file={disk},format=raw,if=ide", "-boot", "c")
    source = lab.qemu(
        "src", "-machine", machine, "-uuid", uuid, *drive,
        paused=False, version=version,
    )  # fmt: skip
    qh.wait_counters_running(source, lab.tmp)
    snap = save_from(lab, source, 2, "zstd", uuid)
    counters = qh.read_counters(qh.block_image(snap, "pc.ram"))
    qh.check_counters(counters)

    disk2 = lab.tmp / "boot-dst.img"
    shutil.copyfile(disk, disk2)
    drive2 = ("-drive", f"file={disk2},format=raw,if=ide", "-boot", "c")
    dest = lab.qemu(
        "dst", "-machine", machine, "-uuid", uuid, "-incoming", "defer", *drive2,
        paused=False, version="10.0",
    )  # fmt: skip
    dest.set_multifd(1, "none")
    dest.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    restored(lab, snap, dest, tq.incoming_port(dest), zero)
    assert counting_past(dest, counters, lab.tmp), f"the guest does not run: {dest.log_tail()}"
    assert dest.cmd("query-status")["status"] == "running"


def counting_past(q: qh.Qemu, counters: list[int], tmp: Path, timeout: float = 20.0) -> bool:
    """Whether every page counter of ``q``'s guest passes ``counters`` within ``timeout``."""
    size = qh.COUNTER_PAGES * qh.PAGE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mem = q.pmemsave(qh.COUNTER_FIRST_PAGE, size, tmp / f"{q.name}-later.mem")
        if all(map(operator.gt, qh.read_counters(mem, qh.COUNTER_FIRST_PAGE), counters)):
            return True
        time.sleep(0.05)
    return False


def test_refused_before_connecting(lab: qh.Lab) -> None:
    """Zero pages in packets for a 7.2 machine type: a QEMU before 9.0 would ignore them, so
    the restore refuses, on one line, and nothing connects to the destination's port."""
    uuid = str(uuidlib.uuid4())
    source = lab.qemu("src", "-uuid", uuid)
    snap = save_from(lab, source, 1, "none", uuid)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0)
        port = listener.getsockname()[1]
        run = run_restore(lab, snap, port, 1, "none", "multifd")
        assert run.wait(30) == 1
        lines = run.stderr().strip().splitlines()
        assert len(lines) == 1, lines
        assert "ConfigError" in lines[0] and "zero pages in packets need QEMU 9.0+" in lines[0]
        assert "'pc-q35-7.2'" in lines[0]
        with pytest.raises(BlockingIOError):
            listener.accept()
