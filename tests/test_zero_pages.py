"""Zero pages between our own ends in the three modes of ``zero_page_detection``.

legacy: main-stream zero records (QEMU 7.2); multifd: the packets' zero-page list (QEMU 9.0+);
none: every page a normal page. Whole migrations over the loopback harness (memory streams and
real TCP), content compared byte for byte, counters on both ends. About 3 s in all.
"""

from __future__ import annotations

import random

import pytest

from multifd_core import RAMBlock, SourceOptions
from multifd_core.cli.ends import source_options
from multifd_core.cli.parser import build_parser
from multifd_core.dialect import Dialect, machine_version, resolve
from multifd_core.errors import ConfigError
from multifd_core.mainstream import MainStreamWriter
from multifd_core.testing import dirty_blocks, image_blocks, run_loopback

TIMEOUT = 60
PAGE = 4096
MODES = ("legacy", "multifd", "none")


def zero_heavy(name: str, size: int, seed: int, every: int = 16) -> RAMBlock:
    """A block that is zero but for one random page in ``every`` (a freshly booted guest)."""
    rng = random.Random(seed)
    buf = bytearray(size)
    for off in range(0, size, every * PAGE):
        buf[off : off + PAGE] = rng.randbytes(PAGE)
    return RAMBlock(name, buf, PAGE)


async def migrate(
    blocks: list[RAMBlock],
    mode: str,
    *,
    transport: str = "memory",
    channels: int = 2,
    rounds: int = 1,
    method: str = "none",
    dest_blocks: list[RAMBlock] | None = None,
):  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    return await run_loopback(
        blocks,
        transport=transport,
        rounds=rounds,
        between_rounds=lambda r, _: dirty_blocks(blocks, 30, rng, r),
        source={"channels": channels, "method": method, "zero_page_detection": mode},
        destination={"channels": channels, "method": method, "blocks": dest_blocks},
        timeout=TIMEOUT,
    )


def same(blocks: list[RAMBlock], received: dict[str, RAMBlock]) -> None:
    for b in blocks:
        assert received[b.name].host.tobytes() == bytes(b.memory), b.name


def zero_count(blocks: list[RAMBlock]) -> int:
    return sum(
        bytes(b.memory[i : i + PAGE]) == bytes(PAGE) for b in blocks for i in range(0, b.size, PAGE)
    )


@pytest.mark.parametrize("mode", MODES)
async def test_zero_heavy_image_each_mode(mode: str) -> None:
    blocks = [zero_heavy("pc.ram", 8 << 20, 1), zero_heavy("vga.vram", 1 << 20, 2, every=3)]
    res = await migrate(blocks, mode)
    same(blocks, res.dst_blocks)
    src, dst = res.src_stats, res.dst_stats
    assert src is not None and dst is not None
    total = sum(b.npages for b in blocks)
    zeros = zero_count(blocks)
    # each page counted once on each end, as zero where the mode detects zero pages
    assert src.normal_pages == dst.normal_pages
    assert src.zero_pages == dst.zero_pages
    assert src.normal_pages + src.zero_pages == total
    assert src.zero_pages == (0 if mode == "none" else zeros)


async def test_multifd_mode_keeps_zero_pages_off_the_main_stream() -> None:
    """9 bytes a page of zero records in legacy; in multifd mode the main stream is only its
    structure, whatever the zero pages."""
    main = {}
    for mode in ("legacy", "multifd"):
        blocks = [zero_heavy("pc.ram", 8 << 20, 3)]
        res = await migrate(blocks, mode)
        assert res.src_stats and res.dst_stats
        assert res.src_stats.main_bytes == res.dst_stats.main_bytes
        main[mode] = res.src_stats.main_bytes
    zeros = zero_count([zero_heavy("pc.ram", 8 << 20, 3)])
    assert main["legacy"] - main["multifd"] >= 8 * zeros
    assert main["multifd"] < 1024


@pytest.mark.parametrize(
    ("mode", "method", "channels"),
    [("multifd", "zlib", 3), ("multifd", "none", 1), ("legacy", "zstd", 2), ("none", "zlib", 2)],
)
async def test_rounds_over_tcp_into_stale_blocks(mode: str, method: str, channels: int) -> None:
    """Pages turning zero and back over four rounds, into destination blocks full of stale
    bytes: every zero page, wherever it travels, is zeroed there."""
    blocks = image_blocks({"pc.ram": 2 << 20, "pc.rom": 128 << 10}, PAGE, seed=4)
    stale = [RAMBlock(b.name, bytearray(b"\xaa" * b.size), PAGE) for b in blocks]
    res = await migrate(
        blocks,
        mode,
        transport="tcp",
        channels=channels,
        rounds=4,
        method=method,
        dest_blocks=stale,
    )
    same(blocks, res.dst_blocks)
    assert res.src_stats and res.dst_stats
    assert res.src_stats.zero_pages == res.dst_stats.zero_pages
    assert (res.src_stats.zero_pages == 0) == (mode == "none")
    assert res.dst_stats.rounds == 4


def test_option_is_validated() -> None:
    with pytest.raises(ConfigError, match="zero_page_detection 'zeros' is not one of"):
        SourceOptions(zero_page_detection="zeros")
    for mode in MODES:
        assert SourceOptions(zero_page_detection=mode).zero_page_detection == mode


@pytest.mark.parametrize(
    ("machine", "expect"),
    [
        ("pc-q35-7.2", Dialect("legacy", True)),
        ("pc-i440fx-8.0", Dialect("legacy", True)),
        ("pc-q35-8.1", Dialect("legacy", False)),
        ("pc-q35-8.2", Dialect("legacy", False)),
        ("pc-q35-9.0", Dialect("multifd", False)),
        ("pc-i440fx-10.0", Dialect("multifd", False)),
    ],
)
def test_dialect_from_the_machine_type(machine: str, expect: Dialect) -> None:
    """QEMU's compat properties: multifd-flush-after-each-section on up to 8.0 (hw_compat_8_0),
    zero-page-detection legacy up to 8.2 (hw_compat_8_2)."""
    assert resolve(SourceOptions(machine_type=machine), qemu=True) == expect
    assert resolve(SourceOptions(machine_type=machine)) == expect


def test_dialect_options_win_and_refusals() -> None:
    opts = SourceOptions(machine_type="pc-q35-10.0", zero_page_detection="legacy")
    assert resolve(opts, qemu=True) == Dialect("legacy", False)
    opts = SourceOptions(machine_type="pc-q35-10.0", multifd_flush_after_each_section=True)
    assert resolve(opts, qemu=True) == Dialect("multifd", True)
    # between our own ends anything goes; a QEMU before 9.0 would ignore the packets' zero list
    old = SourceOptions(machine_type="pc-q35-7.2", zero_page_detection="multifd")
    assert resolve(old) == Dialect("multifd", True)
    with pytest.raises(ConfigError, match=r"zero pages in packets need QEMU 9\.0"):
        resolve(old, qemu=True)
    with pytest.raises(ConfigError, match="names no QEMU version: set multifd_flush"):
        resolve(SourceOptions(machine_type="microvm"), qemu=True)
    assert resolve(SourceOptions(machine_type="microvm")) == Dialect("legacy", True)
    assert machine_version("pc-q35-10.0") == (10, 0)
    assert machine_version("isapc") is None


@pytest.mark.parametrize("command", ["send", "qemu-restore", "demo"])
def test_cli_option_reaches_the_source_options(command: str) -> None:
    where = {"send": ["--connect", "127.0.0.1:1", "f"], "qemu-restore": ["d", "--connect", "h:1"]}
    argv = [command, *where.get(command, [])]
    assert source_options(build_parser().parse_args(argv)).zero_page_detection is None
    for mode in MODES:
        args = build_parser().parse_args([*argv, "--zero-page-detection", mode])
        assert source_options(args).zero_page_detection == mode


def test_writer_multifd_flush_record() -> None:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: a bare be64 0x200 inside a RAM section, nowhere else."""
    w = MainStreamWriter()
    w.header()
    w.ram_setup([("pc.ram", 1 << 20)])
    w.take()
    w.multifd_flush()
    assert w.take() == (0x200).to_bytes(8, "big")
    w.eos()
    with pytest.raises(ConfigError, match="multifd flush outside a RAM section"):
        w.multifd_flush()


@pytest.mark.parametrize("machine", ["pc-q35-10.0", "pc-i440fx-8.0", "pc-q35-7.2"])
async def test_our_own_ends_in_each_qemu_dialect(machine: str) -> None:
    """The machine type picks the dialect (per-round MULTIFD_FLUSH after 8.0, zero pages in
    packets from 9.0); our destination takes each one over several rounds, into stale blocks,
    and both ends count the same rounds."""
    blocks = image_blocks({"pc.ram": 2 << 20}, PAGE, seed=6)
    stale = [RAMBlock(b.name, bytearray(b"\x55" * b.size), PAGE) for b in blocks]
    rng = random.Random(6)
    res = await run_loopback(
        blocks,
        transport="tcp",
        rounds=3,
        between_rounds=lambda r, _: dirty_blocks(blocks, 40, rng, r),
        source={"channels": 3, "method": "zstd", "machine_type": machine},
        destination={"channels": 3, "method": "zstd", "blocks": stale},
        timeout=TIMEOUT,
    )
    same(blocks, res.dst_blocks)
    assert res.src_stats and res.dst_stats
    assert res.src_stats.rounds == res.dst_stats.rounds == 3
    assert res.src_stats.zero_pages == res.dst_stats.zero_pages > 0
    dialect = resolve(SourceOptions(machine_type=machine))
    assert dialect.flush_after_each_section == (machine != "pc-q35-10.0")
    assert dialect.zero_pages_in_packets == (machine == "pc-q35-10.0")
