"""The built-in ``nocomp`` method (value 0): pages travel as they are.

Registered through the plugin manager like any other plugin. The engine reads and writes its
payload straight between sockets and blocks (``raw_payload``); the contexts below do the same
job through the generic method interface, for the conformance kit and for other transports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import DecompressionError
from .hookspecs import hookimpl
from .methods import Buffer, MultiFDMethod, RecvContext, SendContext, scatter


class NocompSend(SendContext):
    def send_prepare(self, pages: Sequence[memoryview]) -> Sequence[Buffer]:
        return pages


class NocompRecv(RecvContext):
    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        expected = sum(len(p) for p in pages)
        if len(payload) != expected:
            raise DecompressionError(f"payload is {len(payload)} bytes, pages need {expected}")
        scatter(payload, pages)


class Nocomp(MultiFDMethod):
    """No compression: QEMU's MULTIFD_FLAG_NOCOMP."""

    name = "none"
    value = 0
    raw_payload = True
    threaded = False
    aliases = ("nocomp",)

    def send_setup(self, channel: int) -> SendContext:
        return NocompSend()

    def recv_setup(self, channel: int) -> RecvContext:
        return NocompRecv()


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [Nocomp]
