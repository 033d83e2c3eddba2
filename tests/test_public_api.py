"""The embedder's public API (issue 14): what ``multifd_core`` exports, the typed keywords that
mirror the options, the Acceptor and Connector protocols in every signature, the status
Literal, and the run-time refusals that match what mypy refuses."""

from __future__ import annotations

import dataclasses
import inspect
import ssl
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import multifd_core as mfd
from multifd_core import errors, options, qemu, stats, tls
from multifd_core.testing import TIMEOUT


def test_every_error_is_exported_at_the_top() -> None:
    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert "MultiFDError" in classes and len(classes) > 30
    assert classes <= set(mfd.__all__), sorted(classes - set(mfd.__all__))
    for name in classes:
        assert getattr(mfd, name) is getattr(errors, name)
    assert qemu.SnapshotError is mfd.SnapshotError  # qemu.py's own, now in errors.py


def test_every_exported_name_exists_once() -> None:
    assert len(mfd.__all__) == len(set(mfd.__all__))
    assert [n for n in mfd.__all__ if not hasattr(mfd, n)] == []


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "_"}


@pytest.mark.parametrize(
    ("changes", "dataclass", "left_out"),
    [
        (options.EndChanges, options.EndOptions, frozenset()),
        (options.SourceChanges, options.SourceOptions, frozenset()),
        (options.DestinationChanges, options.DestinationOptions, frozenset()),
        (options.RestoreChanges, options.SourceOptions, options.FROM_SNAPSHOT),
    ],
)
def test_the_keyword_types_mirror_the_options(
    changes: type, dataclass: type, left_out: frozenset[str]
) -> None:
    """Each TypedDict has the dataclass's fields, with the same types, and no other: the
    options keep the one home of the defaults, mypy checks the keywords against these."""
    fields = _fields(dataclass)
    assert left_out <= set(fields)
    want = {name: kind for name, kind in fields.items() if name not in left_out}
    assert typing.get_type_hints(changes) == want
    assert changes.__required_keys__ == frozenset()  # type: ignore[attr-defined]


def _param(func: Callable[..., Any], name: str) -> Any:
    return typing.get_type_hints(inspect.unwrap(func))[name]


ENDS: list[tuple[Callable[..., Any], str, Any, type]] = [
    (mfd.open_source, "connect", mfd.Connector, mfd.SourceChanges),
    (mfd.migrate, "connect", mfd.Connector, mfd.SourceChanges),
    (mfd.open_destination, "accept", mfd.Acceptor, mfd.DestinationChanges),
    (mfd.receive, "accept", mfd.Acceptor, mfd.DestinationChanges),
    (qemu.qemu_save, "accept", mfd.Acceptor, mfd.DestinationChanges),
    (qemu.qemu_restore, "connect", mfd.Connector, options.RestoreChanges),
]


@pytest.mark.parametrize(("func", "param", "protocol", "changes"), ENDS)
def test_the_ends_take_the_protocols_and_typed_keywords(
    func: Callable[..., Any], param: str, protocol: Any, changes: type
) -> None:
    assert _param(func, param) is protocol
    sig = inspect.signature(inspect.unwrap(func))
    (var_kw,) = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    assert typing.get_type_hints(inspect.unwrap(func))[var_kw.name] == typing.Unpack[changes]
    assert sig.parameters["options"].default is None


def test_the_tls_wrappers_take_and_give_the_protocols() -> None:
    assert _param(tls.tls_connector, "connect") is mfd.Connector
    assert _param(tls.tls_connector, "return") is mfd.Connector
    assert _param(tls.tls_acceptor, "accept") is mfd.Acceptor
    assert _param(tls.TLSAcceptor.__init__, "accept") is mfd.Acceptor
    assert issubclass(mfd.UnixAcceptor, mfd.SocketAcceptor)


def test_status_is_a_literal_of_every_status() -> None:
    assert typing.get_type_hints(mfd.MigrationStats)["status"] is stats.MigrationStatus
    assert typing.get_args(mfd.MigrationStatus) == (
        "setup",
        "active",
        "completed",
        "failed",
        "cancelled",
    )
    assert _param(mfd.MigrationStats.finish, "status") is stats.MigrationStatus


# --- at run time: what mypy refuses, the library refuses too, with a ConfigError -----------


def block() -> mfd.RAMBlock:
    return mfd.RAMBlock("pc.ram", bytearray(64 * 4096))


async def test_a_misspelt_option_is_named_with_the_nearest() -> None:
    net = mfd.MemoryNetwork()
    typo: dict[str, Any] = {"chanels": 2}
    with pytest.raises(
        mfd.ConfigError, match=r"unknown option\(s\) chanels .*did you mean channels"
    ):
        await mfd.migrate([block()], net.connect, **typo)
    with pytest.raises(mfd.ConfigError, match=r"unknown option\(s\) page_sise .*page_size"):
        await mfd.receive(net.accept, **{"page_sise": 4096})


async def test_qemu_restore_refuses_what_the_snapshot_gives(tmp_path: Path) -> None:
    net = mfd.MemoryNetwork()
    for name in sorted(options.FROM_SNAPSHOT - {"verify"}):  # verify: its own (the sha256s)
        with pytest.raises(mfd.ConfigError, match=rf"unknown option\(s\) {name} for qemu_restore"):
            await qemu.qemu_restore(tmp_path, net.connect, **{name: None})


async def test_an_endpoint_that_is_not_one_is_a_config_error() -> None:
    net = mfd.MemoryNetwork()
    bad: Any = 3
    with pytest.raises(mfd.ConfigError, match="the acceptor must be an async callable"):
        async with mfd.open_destination(bad):
            pass  # pragma: no cover
    with pytest.raises(mfd.ConfigError, match="the connector must be an async callable"):
        await mfd.migrate([block()], bad)

    with trio.fail_after(TIMEOUT), pytest.raises(mfd.ConfigError, match="returned int, not an"):
        await mfd.migrate([block()], lambda: 3)

    async def not_a_stream() -> Any:
        return "a stream"

    with trio.fail_after(TIMEOUT), pytest.raises(mfd.ConfigError, match="gave str, not a trio"):
        await mfd.receive(not_a_stream)
    with trio.fail_after(TIMEOUT), pytest.raises(mfd.ConfigError, match="gave str, not a trio"):
        await mfd.migrate([block()], not_a_stream)
    assert net.opened == []


# --- one destination at a time on an acceptor ----------------------------------------------


async def serve_one(
    acceptor: mfd.Acceptor, received: list[bytes], *, task_status: trio.TaskStatus[None]
) -> None:
    """A destination on ``acceptor``, open once started; what it received goes to ``received``."""
    async with mfd.open_destination(acceptor, channels=2) as dst:
        task_status.started()
        await dst.wait()
        received.append(dst.blocks["pc.ram"].host.tobytes())


async def test_a_second_destination_on_one_acceptor_is_refused_at_once() -> None:
    """While a destination is open on an acceptor, a second one (the same acceptor, a TLS
    wrapper of it, another acceptor on its listener) is a ConfigError before it accepts
    anything; the first migrates undisturbed, and afterwards the acceptor serves the next."""
    memory = bytearray(range(256)) * (16 * 4096 // 256)
    async with await mfd.open_tcp_acceptor("127.0.0.1", 0) as acceptor:
        connect = mfd.tcp_connector("127.0.0.1", acceptor.port)
        others: list[mfd.Acceptor] = [
            acceptor,
            mfd.tls_acceptor(acceptor, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)),
            mfd.SocketAcceptor(acceptor.listener),
        ]
        for again in (False, True):  # again: the same acceptor, after the first destination
            received: list[bytes] = []
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_one, acceptor, received)
                    for other in [] if again else others:
                        with pytest.raises(mfd.ConfigError, match="already serves a destination"):
                            async with mfd.open_destination(other, channels=2):
                                pass  # pragma: no cover
                    ram = mfd.RAMBlock("pc.ram", memory)
                    stats = await mfd.migrate([ram], connect, channels=2)
            assert stats.status == "completed"
            assert received == [bytes(memory)]


async def test_two_destinations_on_one_memory_network_are_refused() -> None:
    net = mfd.MemoryNetwork()
    with trio.fail_after(TIMEOUT):
        async with mfd.open_destination(net.accept, connect_timeout=TIMEOUT) as dst:
            with pytest.raises(mfd.ConfigError, match="already serves a destination"):
                await mfd.receive(net.accept)
            await mfd.migrate([block()], net.connect)
            assert (await dst.wait()).status == "completed"
