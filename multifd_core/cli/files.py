"""``multifd send`` and ``multifd recv``: migrate files, one block each, between two hosts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import open_destination, open_source
from ..errors import ConfigError
from ..files import MANIFEST, FileBlock, ReceivedFiles, block_name_for, files_description
from ..options import RECV_DEFAULTS
from .bar import ProgressBar
from .ends import (
    connector,
    destination_options,
    source_options,
    tls_listener,
    with_tls,
    write_ready_file,
)
from .output import summary


async def cmd_send(args: argparse.Namespace) -> dict[str, Any]:
    blocks: list[FileBlock] = []
    try:
        for path in args.files:
            blocks.append(FileBlock(block_name_for(path), path, args.page_size))
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"two files with the same name: {names}")
        progress = ProgressBar(args.progress, "sending")
        connect = with_tls(args, connector(args.connect))
        options = source_options(args)
        async with (
            open_source(blocks, connect, options, description=files_description(blocks)) as src,
            progress.running(src),
        ):
            stats = await src.complete()
    finally:
        for b in blocks:
            b.close()
    if not args.json:
        print(summary("send", stats))
    return stats.as_dict()


async def cmd_recv(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.output)
    received = ReceivedFiles(out_dir, overwrite=args.overwrite, fsync=args.fsync)
    received.max_size = args.max_size
    ok = False
    try:
        accept = await tls_listener(args)
        async with accept:
            write_ready_file(args, accept)
            async with open_destination(
                accept,
                destination_options(args, RECV_DEFAULTS),
                block_factory=received.block_factory,
            ) as dst:
                async with ProgressBar(args.progress, "receiving").running(dst):
                    stats = await dst.wait()
                # in the block: a failure to check or rename still fails the source (its SHUT)
                received.commit(dst.vmdesc)
        ok = True
    finally:
        if not ok:
            received.discard()
    out = stats.as_dict()
    out["files"] = received.paths()
    out["manifest"] = str(out_dir / MANIFEST)
    if not args.json:
        files = ", ".join(out["files"].values())
        print(summary("recv", stats, {"files": files, "manifest": out["manifest"]}))
    return out
