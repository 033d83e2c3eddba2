"""The API boundary keeps causes: the one exception a migration ends with has its own cause (an
OSError under a library error, the program's cause under the program's exception), not the
nursery's ExceptionGroup nor nothing."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
import trio

from multifd_core import RAMBlock, open_source, tcp_connector
from multifd_core.boundary import library_errors
from multifd_core.errors import ChannelError, StorageError
from multifd_core.outdir import OutputDir


class AppError(Exception):
    pass


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_programs_exception_keeps_its_cause() -> None:
    def fail() -> None:
        try:
            raise KeyError("the program's own cause")
        except KeyError as exc:
            raise AppError("the program failed") from exc

    async def task() -> None:
        await trio.sleep(0)
        fail()

    with pytest.raises(AppError) as info:
        with library_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task)
                await trio.sleep_forever()
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.__suppress_context__  # the nursery's group is not shown as its context


async def test_a_connect_failure_keeps_its_oserror() -> None:
    block = RAMBlock("ram", bytearray(4096 * 4))
    with pytest.raises(ChannelError, match=r"^main channel: cannot connect: ") as info:
        async with open_source([block], tcp_connector("127.0.0.1", free_port())):
            pass
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and "127.0.0.1" in str(cause)  # trio's, from the refusal


def test_a_storage_error_keeps_its_oserror(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    try:
        with pytest.raises(StorageError, match="ENOENT") as info:
            out.call("x", "read", lambda: open(tmp_path / "absent", "rb"))
    finally:
        out.close()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert info.value.errno == errno.ENOENT
