"""Snapshots of a QEMU guest's memory at multifd speed: capture a live migration, replay it.

``qemu_save`` is the destination of a QEMU source (7.2, 8.x-10.x: docs/qemu-versions.md)
migrating with the multifd capability: it rebuilds every RAM block into an image file, keeps the
rest of the main stream after the RAM section (device state) byte for byte, and writes a
manifest, with the dialect the source spoke under ``"stream"``. ``qemu_restore`` is a QEMU source
for a QEMU destination started with ``-incoming`` (7.2, or 10.0 with the snapshot's machine
type): the saved blocks go over N multifd channels (any count and method the destination is set
to), in the dialect the machine type expects (``dialect.py``: the sync, where zero pages go),
then the saved device state.

Directory layout::

    manifest.json          format, machine type, uuid, channels, method, blocks, sha256 of files
    block-NN.img           one image per RAM block, in the source's block order
    device-state.bin       the main stream after the RAM END section (device sections, EOF, ...)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid as _uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Unpack

import trio

from . import mainstream as ms
from .destination import Destination, open_destination
from .dialect import resolve as resolve_dialect
from .endpoints import Acceptor, Connector
from .errors import ConfigError, SnapshotError
from .files import FileBlock
from .options import (
    FROM_SNAPSHOT,
    QEMU_SAVE_DEFAULTS,
    DestinationChanges,
    DestinationOptions,
    RestoreChanges,
    SourceOptions,
    check_known,
)
from .outdir import OutputDir, Temp
from .ram import RAMBlock
from .source import open_source
from .stats import MigrationStats
from .wire import MULTIFD_PACKET_SIZE

FORMAT = "multifd-qemu-save/1"
MANIFEST = "manifest.json"
DEVICE_STATE = "device-state.bin"

#: Bytes read per step by ``sha256_file``.
HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256 (see :func:`sha256_fd`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def sha256_fd(fd: int) -> str:
    """The sha256 of the file open at ``fd``, read from its start a chunk at a time into one
    buffer. Not through a mapping: a read fault on a hole of a tmpfs file allocates a zeroed
    page, so hashing a sparse 1 GiB snapshot that way cost 1 GiB of memory and ~0.7 s of page
    clearing (measured)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    pos = 0
    while n := os.preadv(fd, [buf], pos):
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def block_file_name(index: int) -> str:
    return f"block-{index:02d}.img"


@dataclass
class SaveResult:
    directory: Path
    stats: MigrationStats
    manifest: dict[str, Any]


async def qemu_save(
    accept: Acceptor,
    directory: str | os.PathLike[str],
    options: DestinationOptions | None = None,
    *,
    overwrite: bool = False,
    fsync: bool = False,
    **changes: Unpack[DestinationChanges],
) -> SaveResult:
    """Receive one migration from a QEMU source into ``directory``.

    ``options`` default to :data:`QEMU_SAVE_DEFAULTS` (a destination that waits for a person
    to start QEMU's migration); keywords change single fields. Every file is made as
    :class:`~multifd_core.outdir.OutputDir` makes them (no symlink followed, temporary names
    of its own, renamed into place only once everything is written; on any failure none is
    left); a snapshot's file name that exists already is refused unless ``overwrite``;
    ``fsync`` also syncs the directory after the renames."""
    # every QEMU writes zero_pages (bytes 32..35 of a packet), 7.2 as zeros (its unused[])
    opts = DestinationOptions.build(options or QEMU_SAVE_DEFAULTS, **changes)
    opts = DestinationOptions.build(opts, zero_page_packets=True)
    out = OutputDir(directory, overwrite=overwrite, fsync=fsync)
    made: list[tuple[str, RAMBlock, Temp]] = []
    try:
        for name in (DEVICE_STATE, MANIFEST):  # refused before QEMU connects
            out.claim(name)

        def factory(name: str, size: int, page_size: int) -> RAMBlock:
            temp = out.create(block_file_name(len(made)))
            label = out.label(temp.name)
            block = RAMBlock.from_file(name, label, size, page_size, fd=os.dup(temp.fd))
            made.append((name, block, temp))
            return block

        async with open_destination(accept, opts, block_factory=factory) as dst:
            stats = await dst.wait()
            # in the block: QEMU hears of a failure here (its SHUT), as from a QEMU destination
            # that fails to load the device state
            blocks = []
            for name, block, temp in made:
                block.close()
                read = partial(out.call, temp.name, "read", partial(sha256_fd, temp.fd))
                digest = await trio.to_thread.run_sync(read)  # seconds per GiB: off the loop
                entry = {"name": name, "size": block.size, "file": temp.final, "sha256": digest}
                blocks.append(entry)
            device = b"".join(dst.device_state)
            out.write(DEVICE_STATE, device)
            manifest = _manifest(dst, stats, opts, blocks, device)
            out.write(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            out.commit()
    except BaseException:
        for _, block, _ in made:
            # views of a failed migration's mapping may still be held (its frames): then the
            # mapping stays until exit, but the file goes
            with contextlib.suppress(BufferError, ValueError):
                block.close()
        out.discard()
        raise
    finally:
        out.close()
    return SaveResult(out.path, stats, manifest)


def _manifest(
    dst: Destination,
    stats: MigrationStats,
    opts: DestinationOptions,
    blocks: list[dict[str, Any]],
    device: bytes,
) -> dict[str, Any]:
    source_uuid = dst.source_uuid or bytes(16)
    return {
        "format": FORMAT,
        "machine-type": dst.machine_type,
        "uuid": str(_uuid.UUID(bytes=source_uuid)),
        "channels": opts.channels,
        "compression": dst.method.name,
        "page-size": dst.page_size,
        "ram-section-id": dst.ram_section_id,
        "configuration": _jsonable(dst.configuration.subsections if dst.configuration else {}),
        "stream": stream_dialect(dst, stats),
        "blocks": blocks,
        "device-state": {
            "file": DEVICE_STATE,
            "size": len(device),
            "sha256": hashlib.sha256(device).hexdigest(),
        },
        "stats": stats.as_dict(),
    }


def stream_dialect(dst: Destination, stats: MigrationStats) -> dict[str, Any]:
    """The manifest's ``"stream"``: how the source spoke, as observed (docs/qemu-versions.md).

    ``qemu-flush``: "per-section" (a sync at every EOS: QEMU 7.2, machine types up to 8.0) or
    "per-round" (at MULTIFD_FLUSH records: machine types 8.1+). ``zero-pages``: "packets"
    (listed in multifd packets: zero-page-detection=multifd), "records" (main-stream zero
    records: legacy, QEMU 7.2), "packets+records" (both), "none" (no zero page came apart:
    zero-page-detection=none sends them as normal pages). ``commands``: the QEMU_VM_COMMANDs
    between the RAM sections (QEMU 10.0's MIG_CMD_SWITCHOVER_START with machine types 10.0+).
    """
    records = stats.zero_record_pages
    in_packets = stats.zero_pages - records
    zero = [kind for kind, n in (("packets", in_packets), ("records", records)) if n]
    return {
        "qemu-flush": dst.flush,
        "zero-pages": "+".join(zero) or "none",
        "commands": [ms.MIG_CMD_NAMES.get(c, str(c)) for c in dst.commands],
    }


def _jsonable(subsections: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.hex() if isinstance(v, bytes) else list(v) if isinstance(v, tuple) else v)
        for k, v in subsections.items()
    }


def load_manifest(directory: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Read and check a snapshot directory's manifest (and, with ``verify``, every sha256)."""
    d = Path(directory)
    try:
        manifest: dict[str, Any] = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{d}: no {MANIFEST}: not a multifd qemu-save directory") from None
    except ValueError as exc:
        raise SnapshotError(f"{d / MANIFEST}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{d}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    entries = [*manifest["blocks"], manifest["device-state"]]
    for entry in entries:
        path = d / entry["file"]
        if not path.is_file():
            raise SnapshotError(f"{path}: missing")
        if "size" in entry and path.stat().st_size != entry["size"]:
            raise SnapshotError(
                f"{path}: {path.stat().st_size} bytes, manifest says {entry['size']}"
            )
        if verify and sha256_file(path) != entry["sha256"]:
            raise SnapshotError(f"{path}: sha256 differs from the manifest")
    return manifest


async def qemu_restore(
    directory: str | os.PathLike[str],
    connect: Connector,
    options: SourceOptions | None = None,
    *,
    verify: bool = True,
    **changes: Unpack[RestoreChanges],
) -> MigrationStats:
    """Send a snapshot to a QEMU destination waiting with ``-incoming``.

    ``options`` and keywords as for :func:`open_source`; the machine type, uuid, RAM section id
    and device state come from the snapshot. The stream's dialect (the sync, where zero pages
    go) is the one the machine type expects on the destination (``dialect.resolve``), changed by
    ``zero_page_detection`` / ``multifd_flush_after_each_section``; one it cannot serve raises
    ConfigError before connecting. Packet checksums are off unless ``integrity=True`` is
    given: QEMU cannot check them, and the channels then carry QEMU's own bytes. ``verify``
    checks the snapshot's files against their sha256 (the options' fields that the snapshot
    gives, :data:`~multifd_core.options.FROM_SNAPSHOT`, are refused as keywords)."""
    given = ", ".join(sorted(FROM_SNAPSHOT))
    check_known(
        changes, set(RestoreChanges.__optional_keys__), f"qemu_restore ({given}: from the snapshot)"
    )
    d = Path(directory)
    manifest = load_manifest(d, verify=verify)
    opts = SourceOptions.build(
        options,
        integrity=changes.pop("integrity", False),
        **changes,
        uuid=manifest.get("uuid"),
        packet_size=MULTIFD_PACKET_SIZE,  # QEMU's: it has no other
        machine_type=manifest["machine-type"],
        section_id=int(manifest.get("ram-section-id") or SourceOptions.section_id),
    )
    # the destination runs the manifest's machine type (QEMU checks it): its dialect, or a
    # refusal before anything connects
    resolve_dialect(opts, qemu=True)
    page_size = int(manifest.get("page-size", 4096))
    blocks: list[FileBlock] = []
    try:
        for entry in manifest["blocks"]:
            block = FileBlock(entry["name"], d / entry["file"], page_size)
            if block.size != entry["size"]:
                raise SnapshotError(f"block {entry['name']!r}: image size differs")
            blocks.append(block)
        if not blocks:
            raise ConfigError(f"{d}: the snapshot has no RAM blocks")
        device_state = (d / manifest["device-state"]["file"]).read_bytes()
        async with open_source(blocks, connect, opts, device_state=device_state) as src:
            return await src.complete()
    finally:
        for block in blocks:
            block.close()
    raise AssertionError("unreachable")  # pragma: no cover
