"""``multifd qemu-save`` and ``multifd qemu-restore``: a real QEMU's peer, to snapshot its
memory into a directory and to send it back. Like every command module, imported only when
its command runs."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import QEMU_SAVE_DEFAULTS
from ..qemu import qemu_restore, qemu_save
from . import ends
from .output import summary


async def cmd_qemu_save(args: argparse.Namespace) -> dict[str, Any]:
    async with await ends.tls_listener(args, peer_is_qemu=True) as accept:
        ends.write_ready_file(args, accept)
        options = ends.destination_options(args, QEMU_SAVE_DEFAULTS)
        result = await qemu_save(
            accept, args.output, options, overwrite=args.overwrite, fsync=args.fsync
        )
    out = result.stats.as_dict()
    out["directory"] = str(result.directory)
    out["machine-type"] = result.manifest["machine-type"]
    out["blocks"] = [{k: b[k] for k in ("name", "size", "file")} for b in result.manifest["blocks"]]
    if not args.json:
        print(
            summary(
                "qemu-save",
                result.stats,
                {
                    "machine": result.manifest["machine-type"],
                    "saved to": str(result.directory),
                    "blocks": ", ".join(b["name"] for b in result.manifest["blocks"]),
                },
            )
        )
    return out


async def cmd_qemu_restore(args: argparse.Namespace) -> dict[str, Any]:
    connect = ends.with_tls(args, ends.connector(args.connect))
    stats = await qemu_restore(
        args.directory, connect, ends.source_options(args), verify=args.verify
    )
    if not args.json:
        print(summary("qemu-restore", stats))
    return stats.as_dict()
