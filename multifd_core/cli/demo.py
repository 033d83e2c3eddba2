"""``multifd demo``: migrate a generated VM-like image over loopback, in this one process, and
check the destination's copy byte for byte."""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import numpy as np
import trio

from .. import open_destination, open_source
from ..errors import ConfigError, IncompleteMigration
from ..image import dirty_some_pages, vm_like_image
from ..ram import RAMBlock
from ..transport import tcp_connector
from .bar import ProgressBar
from .ends import acceptor, destination_options, source_options
from .output import human, summary


def _blocks_equal(a: memoryview, b: memoryview) -> bool:
    """Byte-for-byte equality, compared in place a chunk at a time (numpy, no copies)."""
    if len(a) != len(b):
        return False
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    step = 1 << 20  # bounded temporaries: one boolean array of a chunk at a time
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step))


async def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    page_size = args.page_size
    size = args.size
    if size % page_size:
        raise ConfigError(f"--size must be a multiple of the page size {page_size}")
    t0 = time.monotonic()
    bios_size = min(256 << 10, size)
    src_blocks = [
        RAMBlock("pc.ram", vm_like_image(size, page_size, seed=1), page_size),
        RAMBlock("pc.bios", vm_like_image(bios_size, page_size, seed=2), page_size),
    ]
    gen_seconds = time.monotonic() - t0
    src_options, dst_options = source_options(args), destination_options(args)
    progress = ProgressBar(args.progress, "migrating")
    rng = random.Random(args.seed)
    accept = await acceptor(("tcp", ("127.0.0.1", 0)))
    result: dict[str, Any] = {}
    async with accept, trio.open_nursery() as nursery:

        async def destination() -> None:
            async with open_destination(accept, dst_options) as dst:
                await dst.wait()
            result["dst"] = dst

        nursery.start_soon(destination)
        async with open_source(
            src_blocks, tcp_connector("127.0.0.1", accept.port), src_options
        ) as src:
            async with progress.running(src):
                for r in range(args.rounds - 1):
                    await src.send_round()
                    # the "guest" keeps writing: about 2 % of the pages change per round
                    ram = src_blocks[0]
                    count = max(1, ram.npages // 50)
                    for off in dirty_some_pages(ram.memory, page_size, count, rng, r + 1):
                        ram.mark_dirty(off)
                await src.complete()
    dst = result["dst"]
    t1 = time.monotonic()
    verified = all(_blocks_equal(b.host, dst.blocks[b.name].host) for b in src_blocks)
    verify_seconds = time.monotonic() - t1
    if not verified:
        raise IncompleteMigration("destination differs from the source after migration")
    out = src.stats.as_dict()
    out["verified"] = verified
    out["image-seconds"] = round(gen_seconds, 3)
    out["verify-seconds"] = round(verify_seconds, 3)
    out["destination"] = dst.stats.as_dict()
    if not args.json:
        print(
            summary(
                "demo migration",
                src.stats,
                {
                    "verified": "destination equals source" if verified else "MISMATCH",
                    "image": f"VM-like, {human(size)} + {human(bios_size)}, {args.rounds} rounds",
                },
            )
        )
    return out
