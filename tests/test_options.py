"""options.py: the one home of every default and its validation, used by every entry point."""

from __future__ import annotations

import dataclasses
import re

import pytest
import trio

from multifd_core import (
    DestinationOptions,
    MemoryNetwork,
    RAMBlock,
    SourceOptions,
    load_methods,
    open_destination,
    open_source,
)
from multifd_core.errors import ConfigError, UnknownMethodError
from multifd_core.nocomp import Nocomp
from multifd_core.options import DEFAULT_MAX_TOTAL_BYTES, QEMU_SAVE_DEFAULTS, RECV_DEFAULTS


def test_defaults_are_the_documented_ones() -> None:
    src, dst = SourceOptions(), DestinationOptions()
    assert (src.channels, src.method, src.idle_timeout, src.connect_timeout) == (2, "none", 60, 30)
    assert src.machine_type == "pc-q35-7.2" and src.section_id == 2
    assert dst.max_total_bytes == DEFAULT_MAX_TOTAL_BYTES == 1 << 40
    assert (dst.handshake_timeout, dst.drain_timeout, dst.page_size) == (10, 30, 4096)
    assert dst.idle_timeout == src.idle_timeout == 60  # one default for both ends
    # the commands' presets change only how long they wait for their peer
    for preset, wait in ((QEMU_SAVE_DEFAULTS, 120), (RECV_DEFAULTS, 60)):
        assert preset.connect_timeout == wait
        assert dataclasses.replace(preset, connect_timeout=dst.connect_timeout) == dst


@pytest.mark.parametrize(
    ("cls", "changes", "named"),
    [
        (SourceOptions, {"channels": 0}, "channel count 0"),
        (DestinationOptions, {"channels": 257}, "channel count 257"),
        (SourceOptions, {"idle_timeout": 0}, "idle_timeout"),
        (SourceOptions, {"connect_timeout": -1}, "connect_timeout"),
        (DestinationOptions, {"handshake_timeout": 0.0}, "handshake_timeout"),
        (DestinationOptions, {"drain_timeout": -5}, "drain_timeout"),
        (DestinationOptions, {"page_size": 1000}, "page size 1000"),
        (DestinationOptions, {"max_blocks": -1}, "max_blocks"),
        (SourceOptions, {"thread_limit": 0}, "thread_limit"),
        (SourceOptions, {"method": Nocomp(), "method_options": {"level": "1"}}, "method object"),
        (SourceOptions, {"chanels": 2}, "unknown option(s) chanels"),
        (DestinationOptions, {"machine_type": "pc"}, "unknown option(s) machine_type"),
    ],
)
def test_bad_values_are_refused_naming_them(
    cls: type[SourceOptions] | type[DestinationOptions], changes: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        cls.build(**changes)  # type: ignore[arg-type]


def test_build_changes_a_copy_and_the_object_is_frozen() -> None:
    base = DestinationOptions(channels=4, idle_timeout=None)
    changed = DestinationOptions.build(base, channels=3)
    assert (changed.channels, changed.idle_timeout) == (3, None)
    assert base.channels == 4 and DestinationOptions.build(base) is base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.channels = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        DestinationOptions(4)  # type: ignore[misc]  # keywords only


def test_method_resolution() -> None:
    registry = load_methods(entry_points=False)
    method = Nocomp()
    assert SourceOptions(method=method).resolve_method() is method
    assert SourceOptions(method=0, registry=registry).resolve_method().name == "none"
    with pytest.raises(UnknownMethodError):
        SourceOptions(method="zstd", registry=registry).resolve_method()


async def test_the_entry_points_use_the_options_they_are_given() -> None:
    """Keywords and an options object reach both ends; keywords win over the object."""
    net = MemoryNetwork()
    memory = bytearray(64 * 4096)
    memory[4096:4100] = b"data"
    opts = DestinationOptions(channels=5, idle_timeout=None)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def destination() -> None:
                async with open_destination(net.accept, opts, channels=3) as dst:
                    await dst.wait()
                assert dst.options == DestinationOptions.build(opts, channels=3)
                assert dst.stats.channels == 3
                assert dst.blocks["ram"].host.tobytes() == bytes(memory)

            nursery.start_soon(destination)
            src_opts = SourceOptions(channels=3, machine_type="pc-i440fx-7.2")
            async with open_source([RAMBlock("ram", memory)], net.connect, src_opts) as src:
                assert src.options is src_opts
                await src.complete()


async def test_a_misspelt_option_fails_before_connecting() -> None:
    calls = []

    async def connect() -> trio.abc.Stream:
        calls.append(1)
        raise AssertionError("must not connect")

    with pytest.raises(ConfigError, match="idle_timout"):
        async with open_source([RAMBlock("ram", bytearray(4096))], connect, idle_timout=3):
            pass
    assert not calls


@pytest.mark.parametrize(
    ("argv", "preset"),
    [
        (["recv", "--listen", "127.0.0.1:0", "--output", "out"], RECV_DEFAULTS),
        (["qemu-save", "--listen", "127.0.0.1:0", "--output", "out"], QEMU_SAVE_DEFAULTS),
        (["demo"], DestinationOptions()),
    ],
)
def test_the_command_line_defaults_are_the_options_defaults(
    argv: list[str], preset: DestinationOptions
) -> None:
    """Without options on the command line, each command's ends are exactly the presets."""
    from multifd_core.cli.ends import destination_options, source_options
    from multifd_core.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    dst = destination_options(args, preset)
    assert dst.registry is not None
    assert dataclasses.replace(dst, registry=None, method_options=None) == preset
    src = source_options(args)
    assert dataclasses.replace(src, registry=None, method_options=None) == SourceOptions()
