"""The ``multifd`` command line: every subcommand, its options, their types and defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..options import (
    DEFAULT_MAX_TOTAL_BYTES,
    QEMU_SAVE_DEFAULTS,
    RECV_DEFAULTS,
    ZERO_PAGE_DETECTION,
    DestinationOptions,
    EndOptions,
    SourceOptions,
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


def size_text(value: int) -> str:
    """``value`` in the largest unit that divides it exactly (parse_size's inverse: 1T)."""
    for unit, scale in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if unit and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


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


def _allow_methods(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-method",
        action="append",
        metavar="NAME",
        help="use only these compression methods, refuse the others (repeatable)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--channels",
        type=int,
        default=EndOptions.channels,
        help=f"multifd channels (default {EndOptions.channels})",
    )
    p.add_argument(
        "--compression", default=EndOptions.method, help="method name (see `multifd plugins`)"
    )
    _allow_methods(p)
    p.add_argument(
        "--idle-timeout",
        type=parse_timeout,
        default=EndOptions.idle_timeout,
        metavar="SECONDS",
        help=f"fail when a channel moves no bytes this long (default {EndOptions.idle_timeout:g}; "
        "0: never)",
    )
    p.add_argument(
        "--deadline",
        type=parse_timeout,
        default=EndOptions.deadline,
        metavar="SECONDS",
        help="fail a migration that has not completed this long after it started (default: "
        "none; 0: none)",
    )
    p.add_argument(
        "-o",
        "--method-option",
        action="append",
        metavar="KEY=VALUE",
        help="option for the compression method, e.g. level=3 (repeatable)",
    )
    p.add_argument(
        "--page-size", type=parse_size, default=DestinationOptions.page_size, help=argparse.SUPPRESS
    )
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


def _zero_pages(p: argparse.ArgumentParser) -> None:
    """--zero-page-detection, for the commands that send (QEMU's zero-page-detection)."""
    p.add_argument(
        "--zero-page-detection",
        choices=ZERO_PAGE_DETECTION,
        default=SourceOptions.zero_page_detection,
        help="zero pages as main-stream records (legacy, QEMU 7.2), in the packets' zero-page "
        "list (multifd, QEMU 9.0+) or sent whole (none); default: QEMU's for the machine type "
        "(legacy up to 8.2, multifd after)",
    )


def _return_path(p: argparse.ArgumentParser, *, default: bool, peer: str) -> None:
    """--return-path, for the commands that send (QEMU's return-path capability)."""
    p.add_argument(
        "--return-path",
        action=argparse.BooleanOptionalAction,
        default=default,
        help=f"open a return path: finish only once {peer} confirmed that everything landed, "
        f"fail with its status when it refused (default {'on' if default else 'off'})",
    )


def _integrity(p: argparse.ArgumentParser, *, peer: str) -> None:
    """--no-integrity, for the commands that send to a destination of ours (demo, send)."""
    p.add_argument(
        "--no-integrity",
        dest="integrity",
        action="store_false",
        default=SourceOptions.integrity,
        help=f"send no packet checksums (default: every packet carries one, which {peer} "
        "checks after the pages landed)",
    )


def _verify(p: argparse.ArgumentParser, *, send: bool) -> None:
    """--verify on send and recv: content digests after the last round (SourceOptions.verify)."""
    p.add_argument(
        "--verify",
        dest="verify_digests",
        action="store_true",
        default=SourceOptions.verify,
        help="send a digest of each file's final content after the last round; the receiver "
        "checks them before renaming anything into place"
        if send
        else "require the sender's content digests (`send --verify`) and check them before "
        "renaming anything into place (checked whenever the sender sends them)",
    )


def _listening(p: argparse.ArgumentParser, *, timeout: float, waits_for: str) -> None:
    """The options of a receiving end (recv, qemu-save)."""
    p.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--uuid", default=None, help="refuse channels with another uuid")
    p.add_argument(
        "--timeout", type=float, default=timeout, help=f"seconds to wait for {waits_for}"
    )
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of DIR that have a final name of this migration (default: refuse "
        "before any data moves)",
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="also fsync DIR after the renames (every file is fsynced before its rename)",
    )


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
    _zero_pages(p)
    _integrity(p, peer="the destination")

    p = sub.add_parser("send", help="migrate files (one block each) to a `multifd recv`")
    _common(p)
    p.add_argument("--connect", type=parse_address, required=True, metavar="HOST:PORT")
    p.add_argument("--uuid", default=None)
    p.add_argument("files", nargs="+")
    _tls_options(p, server=False)
    _zero_pages(p)
    # on: every `multifd recv` of this version answers it; --no-return-path for an older one
    _return_path(p, default=True, peer="`multifd recv`")
    _integrity(p, peer="`multifd recv`")
    _verify(p, send=True)
    p.add_argument(
        "--packet-size",
        type=parse_size,
        default=SourceOptions.packet_size,
        metavar="SIZE",
        help=f"bytes of pages per packet (default {size_text(SourceOptions.packet_size)}; "
        "QEMU's is 512K; a `multifd recv` takes up to its --max-packet-size)",
    )

    p = sub.add_parser("recv", help="receive files from a `multifd send`")
    _common(p)
    _listening(p, timeout=RECV_DEFAULTS.connect_timeout, waits_for="connections")
    _tls_options(p, server=True)
    p.add_argument(
        "--max-size",
        type=parse_size,
        default=DEFAULT_MAX_TOTAL_BYTES,
        metavar="SIZE",
        help="refuse a source announcing more bytes than this in all "
        f"(default {size_text(DEFAULT_MAX_TOTAL_BYTES)})",
    )
    p.add_argument(
        "--max-packet-size",
        type=parse_size,
        default=DestinationOptions.max_packet_size,
        metavar="SIZE",
        help="refuse a source announcing larger packets "
        f"(default {size_text(DestinationOptions.max_packet_size)})",
    )
    _verify(p, send=False)

    p = sub.add_parser(
        "qemu-save", help="be the destination of a QEMU migration; save its memory to DIR"
    )
    _common(p)
    _listening(p, timeout=QEMU_SAVE_DEFAULTS.connect_timeout, waits_for="QEMU")
    _tls_options(p, server=True)

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
    _tls_options(p, server=False)
    _zero_pages(p)
    _return_path(p, default=True, peer="the QEMU destination")

    p = sub.add_parser("plugins", help="list the installed compression methods")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--check", action="store_true", help="exit 1 when any plugin has a problem (after listing)"
    )
    _allow_methods(p)

    p = sub.add_parser(
        "new-plugin", help="write a new compression plugin distribution (a working skeleton)"
    )
    p.add_argument("name", metavar="NAME", help="the method's name, a lowercase identifier")
    p.add_argument(
        "--value",
        type=int,
        required=True,
        metavar="N",
        help="its compression value, 0..7, one no installed plugin claims",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="a new or empty directory")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser
