"""``multifd send`` and ``multifd recv``: migrate files, one block each, between two hosts."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from .. import open_destination, open_source
from ..errors import ConfigError
from ..files import (
    FileBlock,
    block_name_for,
    files_description,
    parse_files_description,
    safe_output_path,
)
from ..options import RECV_DEFAULTS
from ..ram import RAMBlock
from ..tls import TLSAcceptor, tls_acceptor
from ..transport import Acceptor
from .ends import (
    acceptor,
    connector,
    destination_options,
    source_options,
    tls_server_context,
    with_tls,
    write_ready_file,
)
from .output import Progress, summary


async def cmd_send(args: argparse.Namespace) -> dict[str, Any]:
    blocks: list[FileBlock] = []
    try:
        for path in args.files:
            blocks.append(FileBlock(block_name_for(path), path, args.page_size))
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"two files with the same name: {names}")
        progress = Progress(args.progress, "sending")
        planned = [sum(b.npages for b in blocks)]
        connect = with_tls(args, connector(args.connect))
        options = source_options(args)
        async with (
            open_source(blocks, connect, options, description=files_description(blocks)) as src,
            progress.running(src.stats, planned),
        ):
            stats = await src.complete()
        progress.finish(stats, planned[0])
    finally:
        for b in blocks:
            b.close()
    if not args.json:
        print(summary("send", stats))
    return stats.as_dict()


async def cmd_recv(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, tuple[RAMBlock, Path]] = {}

    def factory(name: str, size: int, page_size: int) -> RAMBlock:
        final = safe_output_path(out_dir, name)
        part = final.with_name(final.name + ".part")
        block = RAMBlock.from_file(name, part, size, page_size, create=True)
        made[name] = (block, final)
        return block

    tls = tls_server_context(args)
    accept: Acceptor | TLSAcceptor = await acceptor(args.listen)
    if tls is not None:
        accept = tls_acceptor(accept, tls)
    ok = False
    try:
        async with accept:
            write_ready_file(args, accept)
            async with open_destination(
                accept, destination_options(args, RECV_DEFAULTS), block_factory=factory
            ) as dst:
                stats = await dst.wait()
        sizes = parse_files_description(dst.vmdesc)
        for name, (block, final) in made.items():
            block.close()
            part = final.with_name(final.name + ".part")
            if name in sizes:
                os.truncate(part, sizes[name])
            os.replace(part, final)
        ok = True
    finally:
        if not ok:
            for block, final in made.values():
                # the error on its way out may still hold views of the mapping (frames of the
                # channel tasks): then the mmap stays open until exit, but the file must go
                with contextlib.suppress(BufferError):
                    block.close()
                final.with_name(final.name + ".part").unlink(missing_ok=True)
    out = stats.as_dict()
    out["files"] = {name: str(final) for name, (_, final) in made.items()}
    if not args.json:
        print(summary("recv", stats, {"files": ", ".join(out["files"].values())}))
    return out
