"""The ``multifd`` command: demo, send, recv, plugins."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from . import __version__
from .boundary import library_errors
from .destination import open_destination
from .errors import ConfigError, IncompleteMigration, MultiFDError
from .files import (
    FileBlock,
    block_name_for,
    files_description,
    parse_files_description,
    safe_output_path,
)
from .image import dirty_some_pages, vm_like_image
from .malloc import tune_malloc
from .ram import RAMBlock
from .registry import load_methods
from .source import open_source
from .stats import MigrationStats
from .tls import client_context, server_context, tls_acceptor, tls_connector
from .transport import (
    Connector,
    open_tcp_acceptor,
    open_unix_acceptor,
    tcp_connector,
    unix_connector,
)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r} (examples: 4096, 64K, 256M, 1G)"
        ) from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(value)


def parse_address(text: str) -> tuple[str, Any]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""
    if text.startswith("unix:"):
        return "unix", text[5:]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"bad address {text!r}: want HOST:PORT or unix:PATH")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


def parse_options(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"method option {item!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_")] = value
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, or forced)."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self.shown = False

    def show(self, stats: MigrationStats, planned: int) -> None:
        if not self.enabled:
            return
        done = stats.normal_pages + stats.zero_pages
        frac = min(1.0, done / planned) if planned else 0.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = human(stats.throughput) + "/s"
        sys.stderr.write(
            f"\r{self.label} [{bar}] {frac * 100:5.1f}%  round {stats.rounds}  "
            f"{human(stats.wire_bytes)} on the wire  {rate}   "
        )
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def _progress_loop(progress: Progress, stats: MigrationStats, planned: list[int]) -> None:
    while True:
        progress.show(stats, planned[0])
        await trio.sleep(0.2)


def _summary(title: str, stats: MigrationStats, extra: dict[str, Any] | None = None) -> str:
    lines = [
        f"{title}: {stats.status}",
        f"  blocks total      {human(stats.total_bytes)}",
        f"  pages             {stats.normal_pages} normal, {stats.zero_pages} zero"
        + (f", {stats.inline_pages} inline" if stats.inline_pages else ""),
        f"  packets           {stats.packets} on {stats.channels} channel(s), "
        f"{stats.rounds} sync rounds",
        f"  wire bytes        {human(stats.wire_bytes)} (main {human(stats.main_bytes)}, "
        f"multifd {human(stats.multifd_bytes)})",
        f"  compression       {stats.method}, ratio {stats.compression_ratio:.2f}",
        f"  time              {stats.seconds:.3f} s",
        f"  throughput        {human(stats.throughput)}/s of page data",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"  {key:<17} {value}")
    return "\n".join(lines)


def _connector(address: tuple[str, Any]) -> Connector:
    kind, where = address
    return unix_connector(where) if kind == "unix" else tcp_connector(*where)


async def _acceptor(address: tuple[str, Any]) -> Any:
    kind, where = address
    if kind == "unix":
        return await open_unix_acceptor(where)
    return await open_tcp_acceptor(*where)


def _tls_connector(args: argparse.Namespace, connect: Connector) -> Connector:
    """send: ``connect`` wrapped in TLS when any --tls option is given."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_hostname):
        return connect
    if args.tls_cert and not args.tls_key:
        raise ConfigError("--tls-cert needs --tls-key (the client certificate's private key)")
    if args.tls_key and not args.tls_cert:
        raise ConfigError("--tls-key needs --tls-cert (the client certificate)")
    kind, where = args.connect
    hostname = args.tls_hostname or (where[0] if kind == "tcp" else None)
    if not hostname:
        raise ConfigError("TLS over unix: needs --tls-hostname (the name in the server's cert)")
    ctx = client_context(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    return tls_connector(connect, ctx, hostname)


def _tls_server_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """recv: the server's TLS context when any --tls option is given."""
    if not (args.tls or args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ConfigError(
            "TLS on the receiving end needs --tls-cert and --tls-key "
            "(this server's certificate and private key)"
        )
    return server_context(
        cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca
    )


def _blocks_equal(a: memoryview, b: memoryview) -> bool:
    """Byte-for-byte equality, compared in place a chunk at a time (numpy, no copies)."""
    if len(a) != len(b):
        return False
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    step = 1 << 20  # bounded temporaries: one boolean array of a chunk at a time
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step))


# --- demo ---------------------------------------------------------------------------------


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
    options = parse_options(args.method_option)
    progress = Progress(args.progress, "migrating")
    rng = random.Random(args.seed)
    acceptor = await _acceptor(("tcp", ("127.0.0.1", 0)))
    result: dict[str, Any] = {}
    planned = [sum(b.npages for b in src_blocks)]
    async with acceptor, trio.open_nursery() as nursery:

        async def destination() -> None:
            async with open_destination(
                acceptor,
                channels=args.channels,
                method=args.compression,
                method_options=options,
                page_size=page_size,
                **_engine(args),
            ) as dst:
                await dst.wait()
            result["dst"] = dst

        nursery.start_soon(destination)
        async with open_source(
            src_blocks,
            tcp_connector("127.0.0.1", acceptor.port),
            channels=args.channels,
            method=args.compression,
            method_options=options,
            **_engine(args),
        ) as src:
            async with trio.open_nursery() as bar:
                bar.start_soon(_progress_loop, progress, src.stats, planned)
                for r in range(args.rounds - 1):
                    await src.send_round()
                    # the "guest" keeps writing: about 2 % of the pages change per round
                    ram = src_blocks[0]
                    count = max(1, ram.npages // 50)
                    for off in dirty_some_pages(ram.memory, page_size, count, rng, r + 1):
                        ram.mark_dirty(off)
                    planned[0] += ram.dirty_count()
                await src.complete()
                bar.cancel_scope.cancel()
            progress.show(src.stats, planned[0])
            progress.close()
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
            _summary(
                "demo migration",
                src.stats,
                {
                    "verified": "destination equals source" if verified else "MISMATCH",
                    "image": f"VM-like, {human(size)} + {human(bios_size)}, {args.rounds} rounds",
                },
            )
        )
    return out


# --- send / recv --------------------------------------------------------------------------


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
        async with (
            open_source(
                blocks,
                _tls_connector(args, _connector(args.connect)),
                channels=args.channels,
                method=args.compression,
                method_options=parse_options(args.method_option),
                uuid=args.uuid,
                description=files_description(blocks),
                **_engine(args),
            ) as src,
            trio.open_nursery() as bar,
        ):
            bar.start_soon(_progress_loop, progress, src.stats, planned)
            stats = await src.complete()
            bar.cancel_scope.cancel()
        progress.show(stats, planned[0])
        progress.close()
    finally:
        for b in blocks:
            b.close()
    if not args.json:
        print(_summary("send", stats))
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

    tls = _tls_server_context(args)
    acceptor = await _acceptor(args.listen)
    if tls is not None:
        acceptor = tls_acceptor(acceptor, tls)
    ok = False
    try:
        async with acceptor:
            if args.ready_file:
                Path(args.ready_file).write_text(str(acceptor.address))
            async with open_destination(
                acceptor,
                channels=args.channels,
                method=args.compression,
                method_options=parse_options(args.method_option),
                block_factory=factory,
                uuid=args.uuid,
                page_size=args.page_size,
                connect_timeout=args.timeout,
                max_total_bytes=args.max_size,
                **_engine(args),
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
        print(_summary("recv", stats, {"files": ", ".join(out["files"].values())}))
    return out


async def cmd_qemu_save(args: argparse.Namespace) -> dict[str, Any]:
    from .qemu import qemu_save

    acceptor = await _acceptor(args.listen)
    async with acceptor:
        if args.ready_file:
            Path(args.ready_file).write_text(str(acceptor.address))
        result = await qemu_save(
            acceptor,
            args.output,
            channels=args.channels,
            method=args.compression,
            method_options=parse_options(args.method_option),
            uuid=args.uuid,
            connect_timeout=args.timeout,
            **_engine(args),
        )
    out = result.stats.as_dict()
    out["directory"] = str(result.directory)
    out["machine-type"] = result.manifest["machine-type"]
    out["blocks"] = [{k: b[k] for k in ("name", "size", "file")} for b in result.manifest["blocks"]]
    if not args.json:
        print(
            _summary(
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
    from .qemu import qemu_restore

    stats = await qemu_restore(
        args.directory,
        _connector(args.connect),
        channels=args.channels,
        method=args.compression,
        method_options=parse_options(args.method_option),
        verify=args.verify,
        **_engine(args),
    )
    if not args.json:
        print(_summary("qemu-restore", stats))
    return stats.as_dict()


def cmd_plugins(args: argparse.Namespace) -> dict[str, Any]:
    registry = load_methods(allow=args.allow_method)
    methods = [
        {
            "value": m.value,
            "flags": m.value << 1,
            "name": m.name,
            "aliases": list(m.cls.aliases),
            "distribution": m.distribution,
            "plugin": m.plugin,
        }
        for m in registry
    ]
    problems = [f"{type(p).__name__}: {p}" for p in registry.problems]
    if not args.json:
        for m in methods:
            print(f"{m['value']}  flags {m['flags']:#04x}  {m['name']:<8} {m['distribution']}")
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
    return {"methods": methods, "problems": problems}


# --- argument parsing ---------------------------------------------------------------------


def _allow_methods(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-method",
        action="append",
        metavar="NAME",
        help="use only these compression methods, refuse the others (repeatable)",
    )


def parse_timeout(text: str) -> float | None:
    """Seconds > 0, or 0 / "none" for no timeout."""
    if text.strip().lower() in ("0", "none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a timeout must be > 0 seconds: {text!r}")
    return value


def _engine(args: argparse.Namespace) -> dict[str, Any]:
    """Options every subcommand passes to the engine (open_source / open_destination)."""
    allowed = args.allow_method
    if allowed is not None and args.compression not in allowed:
        raise ConfigError(
            f"--compression {args.compression} is not among --allow-method {', '.join(allowed)}"
        )
    return {"registry": load_methods(allow=allowed), "idle_timeout": args.idle_timeout}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, default=2, help="multifd channels (default 2)")
    p.add_argument("--compression", default="none", help="method name (see `multifd plugins`)")
    _allow_methods(p)
    p.add_argument(
        "--idle-timeout",
        type=parse_timeout,
        default=60.0,
        metavar="SECONDS",
        help="fail when a channel moves no bytes this long (default 60; 0: never)",
    )
    p.add_argument(
        "-o",
        "--method-option",
        action="append",
        metavar="KEY=VALUE",
        help="option for the compression method, e.g. level=3 (repeatable)",
    )
    p.add_argument("--page-size", type=parse_size, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def _tls_options(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("TLS (every channel; implied by any --tls-* option)")
    g.add_argument("--tls", action="store_true", help="use TLS")
    if server:
        g.add_argument("--tls-cert", metavar="FILE", help="this server's certificate (PEM)")
        g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
        g.add_argument(
            "--tls-client-ca",
            metavar="FILE",
            help="require client certificates signed by this CA (PEM): mutual TLS",
        )
    else:
        g.add_argument(
            "--tls-ca", metavar="FILE", help="CA to verify the server with (default: system's)"
        )
        g.add_argument(
            "--tls-hostname",
            metavar="NAME",
            help="name the server's certificate must carry (default: the host connected to)",
        )
        g.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for mTLS")
        g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")


def _listening(p: argparse.ArgumentParser, *, timeout: float, waits_for: str) -> None:
    """The options of a receiving end (recv, qemu-save)."""
    p.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--uuid", default=None, help="refuse channels with another uuid")
    p.add_argument(
        "--timeout", type=float, default=timeout, help=f"seconds to wait for {waits_for}"
    )
    p.add_argument("--ready-file", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multifd", description="QEMU-compatible multifd memory migration"
    )
    parser.add_argument("--version", action="version", version=f"multifd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="migrate a generated VM-like image over loopback and verify")
    _common(p)
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--rounds", type=int, default=3, help="precopy rounds (default 3)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("send", help="migrate files (one block each) to a `multifd recv`")
    _common(p)
    p.add_argument("--connect", type=parse_address, required=True, metavar="HOST:PORT")
    p.add_argument("--uuid", default=None)
    p.add_argument("files", nargs="+")
    _tls_options(p, server=False)

    p = sub.add_parser("recv", help="receive files from a `multifd send`")
    _common(p)
    _listening(p, timeout=60.0, waits_for="connections")
    _tls_options(p, server=True)
    p.add_argument(
        "--max-size",
        type=parse_size,
        default=parse_size("1T"),
        metavar="SIZE",
        help="refuse a source announcing more bytes than this in all (default 1T)",
    )

    p = sub.add_parser(
        "qemu-save", help="be the destination of a QEMU migration; save its memory to DIR"
    )
    _common(p)
    _listening(p, timeout=120.0, waits_for="QEMU")

    p = sub.add_parser(
        "qemu-restore", help="be the source for a QEMU destination started with -incoming"
    )
    _common(p)
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--connect", type=parse_address, required=True, metavar="HOST:PORT")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every file's sha256 against the manifest first (default on)",
    )

    p = sub.add_parser("plugins", help="list the installed compression methods")
    p.add_argument("--json", action="store_true")
    _allow_methods(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "progress", None) is None and hasattr(args, "progress"):
        args.progress = sys.stderr.isatty()
    try:
        if args.command == "plugins":
            out = cmd_plugins(args)
        else:
            if args.channels < 1:
                raise ConfigError("--channels must be at least 1")
            if getattr(args, "rounds", 1) < 1:
                raise ConfigError("--rounds must be at least 1")
            handler = {
                "demo": cmd_demo,
                "send": cmd_send,
                "recv": cmd_recv,
                "qemu-save": cmd_qemu_save,
                "qemu-restore": cmd_qemu_restore,
            }[args.command]
            tune_malloc()
            with library_errors():  # demo runs both ends in one nursery: unwrap its group
                out = trio.run(handler, args)
    except MultiFDError as exc:
        print(f"multifd {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"multifd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"multifd {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
