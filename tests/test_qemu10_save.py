"""``multifd qemu-save`` from a real QEMU 10.0 source (issue 12, items 1 and 3, the capture side).

QEMU 10.0 speaks one of several dialects, chosen by its machine type and its migration
parameters (docs/qemu-versions.md): where it syncs its channels (at MULTIFD_FLUSH records with
machine types 8.1+, at every EOS with older ones), where its zero pages go
(``zero-page-detection``: listed in packets, main-stream records, or sent as normal pages), and
whether it writes MIG_CMD_SWITCHOVER_START (machine types 10.0+). The capture must hold exactly
the source's memory (as QEMU's pmemsave reads it) in each, and the manifest must record the
dialect it saw.

The matrix (3 methods x 1, 2, 4, 8 channels x 3 zero-page detections x 4 machine types, 144
combinations) is covered pairwise: every pair of values of any two factors in at least one of the
16 cases of :data:`PAIRWISE`. Each case costs one 64 MiB TCG guest migrated while paused: about
1 s (0.8-1.4 s measured, 17 s for the 16); each live guest 2.5-4.5 s; the three machine types
checked for QEMU's per-machine defaults about 1 s each.
"""

from __future__ import annotations

import itertools
import os
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from multifd_core.qemu import load_manifest

if os.fspath(Path(__file__).resolve().parent) not in sys.path:  # for the harness
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("qemu_harness")
import qemu_harness as qh  # noqa: E402

pytest_plugins = ["qemu_harness"]
QEMU_TESTS = True

CHANNELS = (1, 2, 4, 8)
MACHINES = ("pc-q35-10.0", "pc-i440fx-10.0", "pc-q35-7.2", "pc-i440fx-7.2")
METHODS = ("none", "zlib", "zstd")
ZERO_PAGE_DETECTION = ("multifd", "legacy", "none")

#: (channels, machine, method, zero-page-detection): rows of the orthogonal array L16(4^5) over
#: GF(4), the 4-level columns folded onto the 3 methods and detections (a fold keeps every pair).
PAIRWISE = [
    (1, "pc-q35-10.0", "none", "multifd"),
    (1, "pc-i440fx-10.0", "zstd", "multifd"),
    (1, "pc-q35-7.2", "zstd", "legacy"),
    (1, "pc-i440fx-7.2", "zlib", "none"),
    (2, "pc-q35-10.0", "zlib", "legacy"),
    (2, "pc-i440fx-10.0", "zstd", "none"),
    (2, "pc-q35-7.2", "zstd", "multifd"),
    (2, "pc-i440fx-7.2", "none", "multifd"),
    (4, "pc-q35-10.0", "zstd", "none"),
    (4, "pc-i440fx-10.0", "none", "legacy"),
    (4, "pc-q35-7.2", "zlib", "multifd"),
    (4, "pc-i440fx-7.2", "zstd", "multifd"),
    (8, "pc-q35-10.0", "zstd", "multifd"),
    (8, "pc-i440fx-10.0", "zlib", "multifd"),
    (8, "pc-q35-7.2", "none", "none"),
    (8, "pc-i440fx-7.2", "zstd", "legacy"),
]


def expected_stream(machine: str, detection: str) -> dict[str, object]:
    """The manifest's ``"stream"`` for a QEMU 10.0 source of ``machine``."""
    new = machine.endswith("-10.0")
    return {
        "qemu-flush": "per-round" if new else "per-section",
        "zero-pages": {"multifd": "packets", "legacy": "records", "none": "none"}[detection],
        "commands": ["MIG_CMD_SWITCHOVER_START"] if new else [],
    }


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[qh.Lab]:
    qh.skip_unless_qemu("10.0")
    with qh.lab(tmp_path) as the_lab:
        yield the_lab


def test_the_matrix_is_pairwise() -> None:
    """No QEMU: every pair of values of any two factors is in a case."""
    factors = (CHANNELS, MACHINES, METHODS, ZERO_PAGE_DETECTION)
    for a, b in itertools.combinations(range(4), 2):
        seen = {(case[a], case[b]) for case in PAIRWISE}
        assert seen == set(itertools.product(factors[a], factors[b])), (a, b)


@pytest.mark.parametrize(
    ("channels", "machine", "method", "detection"),
    PAIRWISE,
    ids=[f"{c}ch-{m}-{meth}-zpd_{z}" for c, m, meth, z in PAIRWISE],
)
def test_capture(lab: qh.Lab, channels: int, machine: str, method: str, detection: str) -> None:
    uuid = str(uuidlib.uuid4())
    source = lab.qemu(
        "src", "-machine", machine, *qh.pattern_loader(lab.tmp), "-uuid", uuid, version="10.0"
    )
    source.set_multifd(channels, method, **{"zero-page-detection": detection})
    snap = lab.tmp / "snap"
    save, info = lab.capture(source, snap, channels=channels, method=method, uuid=uuid)

    out = save.json()
    assert out["status"] == "completed" and out["machine-type"] == machine
    assert out["ram"]["dirty-sync-count"] >= 2
    manifest = load_manifest(snap, verify=True)
    assert manifest["machine-type"] == machine and manifest["uuid"] == uuid
    assert manifest["stream"] == expected_stream(machine, detection)
    if detection != "none":  # QEMU counts its zero pages as "duplicate", in packets or not
        assert out["ram"]["duplicate"] == info["ram"]["duplicate"] > 0
    sizes = {b["name"]: b["size"] for b in manifest["blocks"]}
    assert sizes["pc.ram"] == qh.RAM_SIZE and sum(sizes.values()) == info["ram"]["total"]
    assert manifest["device-state"]["size"] > 0

    image = qh.block_image(snap, "pc.ram")
    at = qh.PATTERN_ADDR
    assert image[at : at + qh.PATTERN_SIZE] == qh.pattern()
    whole = source.pmemsave(0, qh.RAM_SIZE, lab.tmp / "src.mem")
    assert qh.outside_legacy_hole(image, whole), qh.first_difference(image, whole)


@pytest.mark.parametrize(
    ("machine", "method", "detection"),
    [("pc-q35-10.0", "zstd", "multifd"), ("pc-i440fx-7.2", "none", "legacy")],
)
def test_live_guest(lab: qh.Lab, machine: str, method: str, detection: str) -> None:
    """A guest that keeps writing, over several rounds: per-round FLUSH barriers with zero pages
    in packets (10.0's own machine type), per-section EOS barriers (a 7.2 machine type). The
    boot sector's INVLPG is for QEMU 7.2's TCG; 10.0 does not need it and runs it the same."""
    # QEMU computes its switchover threshold (bandwidth x downtime limit) first 100 ms into the
    # migration, and before that it is 0: a first pass done by then (QEMU 10's zero pages in
    # packets cost it almost nothing) completes at once. At 1 MB/s the first pass takes longer
    # (then QEMU 10 goes through rounds quickly: ~100 bitmap syncs a second, measured).
    parameters = {"zero-page-detection": detection, "max-bandwidth": 1 << 20}
    live = qh.live_capture(lab, method, "-machine", machine, version="10.0", **parameters)
    stream = load_manifest(live.snap)["stream"]
    assert stream == expected_stream(machine, detection)
    # per-round: one barrier per pass over the dirty pages; QEMU counts a bitmap sync per pass
    # and one at setup, which is not a round here
    assert live.out["ram"]["dirty-sync-count"] >= 3


@pytest.mark.parametrize(
    ("machine", "stream"),
    [
        ("pc-q35-8.0", {"qemu-flush": "per-section", "zero-pages": "records", "commands": []}),
        ("pc-q35-8.2", {"qemu-flush": "per-round", "zero-pages": "records", "commands": []}),
        ("pc-q35-9.2", {"qemu-flush": "per-round", "zero-pages": "packets", "commands": []}),
    ],
)
def test_machine_type_defaults(lab: qh.Lab, machine: str, stream: dict[str, object]) -> None:
    """The dialect QEMU 10.0 picks by machine type alone (docs/qemu-versions.md: hw_compat_8_0
    keeps the per-section sync, hw_compat_8_2 legacy zero pages, hw_compat_9_2 no
    SWITCHOVER_START), each captured whole. About 1 s each."""
    source = lab.qemu("src", "-machine", machine, *qh.pattern_loader(lab.tmp), version="10.0")
    source.set_multifd(2, "none")
    snap = lab.tmp / "snap"
    save = lab.qemu_save(snap, channels=2, method="none")
    assert save.port is not None
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{save.port}")
    assert source.wait_migration(60)["status"] == "completed", source.log_tail()
    assert save.wait(60) == 0, save.stderr()
    assert load_manifest(snap)["stream"] == stream
    image = qh.block_image(snap, "pc.ram")
    whole = source.pmemsave(0, qh.RAM_SIZE, lab.tmp / "src.mem")
    assert qh.outside_legacy_hole(image, whole), qh.first_difference(image, whole)
