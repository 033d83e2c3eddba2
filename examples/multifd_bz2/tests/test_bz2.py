"""Tests of the example bz2 plugin: multifd-core's conformance kit, registration and options."""

from __future__ import annotations

import bz2

import pytest

import multifd_core
from multifd_core.errors import ConfigError, DecompressionError
from multifd_core.testing import MethodConformance

try:
    from multifd_bz2 import Bz2Method, __version__
except ModuleNotFoundError as exc:  # skip, rather than fail to collect, when not installed
    if exc.name != "multifd_bz2":
        raise
    pytest.skip(
        "the example plugin is not installed: pip install -e examples/multifd_bz2",
        allow_module_level=True,
    )

PAGE = 4096


class TestBz2Conformance(MethodConformance):
    """Every test of the kit (round trips over TCP and memory streams, hostile payloads...)."""

    def make_method(self) -> Bz2Method:
        return Bz2Method()


def test_found_through_the_entry_point() -> None:
    registry = multifd_core.load_methods()
    assert not [p for p in registry.problems if "bz2" in str(p)]
    info = registry.get("bz2")
    assert info.value == 4 and registry.get(4) is info
    assert info.cls is Bz2Method
    assert info.plugin == "bz2"  # the entry point's name
    assert info.distribution == f"multifd-bz2-example {__version__}"
    method = registry.create("bz2", level="5")
    assert isinstance(method, Bz2Method) and method.level == 5
    assert method.flags == 0x8 and method.threaded and not method.raw_payload


def test_options() -> None:
    assert Bz2Method().options == {"level": 1}
    assert Bz2Method(level="9").options == {"level": 9}  # the CLI's -o level=9: a string
    assert Bz2Method(level=3).level == 3
    for bad in (
        {"level": "0"},
        {"level": 10},
        {"level": "fast"},
        {"level": "2.5"},
        {"level": 2.0},
        {"level": True},
        {"level": None},
        {"blocksize": "9"},
        {"level": "1", "acceleration": "1"},
    ):
        with pytest.raises(ConfigError):
            Bz2Method(**bad)


def test_payload_is_one_plain_bz2_stream() -> None:
    pages = [bytes([i]) * PAGE for i in range(5)]
    raw = b"".join(pages)
    runs = [memoryview(raw)[: 2 * PAGE], memoryview(raw)[2 * PAGE :]]
    for level in (1, 9):
        payload = b"".join(Bz2Method(level=level).send_setup(0).send_prepare(runs))
        assert payload == bz2.compress(raw, level)
        assert len(payload) <= Bz2Method().payload_size(len(raw))[1]


def test_two_streams_in_one_payload_are_refused() -> None:
    one = bz2.compress(bytes(PAGE), 1)
    out = bytearray(2 * PAGE)
    recv = Bz2Method().recv_setup(0)
    with pytest.raises(DecompressionError, match="after the end of its stream"):
        recv.recv_pages(memoryview(one + one), [memoryview(out)[:PAGE]])
    with pytest.raises(DecompressionError, match="decompresses to 4096 bytes"):
        recv.recv_pages(memoryview(one), [memoryview(out)])
    assert out == bytes(2 * PAGE)  # nothing written when a payload is refused
