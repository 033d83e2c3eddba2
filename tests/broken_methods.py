"""Compression methods that break ``recv_pages``'s contract without a word: they fill the pages
from an uncompressed payload (nocomp's contexts) and then leave one byte unwritten (``short``)
or flip one (``flipbyte``). The stream's structure stays valid; only the integrity checks can
tell. Used in process by tests/test_integrity.py, and as an installed plugin in ``multifd``
subprocesses (``procs.plugin_site(root, "broken_methods")``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from multifd_core import MultiFDMethod, RecvContext, SendContext, hookimpl
from multifd_core.nocomp import NocompRecv, NocompSend


class ShortRecv(NocompRecv):
    """Writes every byte of the pages but the last one (left as it was)."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        keep = pages[-1][-1]
        super().recv_pages(payload, pages)
        pages[-1][-1] = keep


class FlipRecv(NocompRecv):
    """Writes the pages, then flips the low bit of their first byte."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        super().recv_pages(payload, pages)
        pages[0][0] ^= 0x01


class ShortMethod(MultiFDMethod):
    name = "short"
    value = 6
    threaded = True

    def send_setup(self, channel: int) -> SendContext:
        return NocompSend()

    def recv_setup(self, channel: int) -> RecvContext:
        return ShortRecv()


class FlipMethod(ShortMethod):
    name = "flipbyte"
    value = 7

    def recv_setup(self, channel: int) -> RecvContext:
        return FlipRecv()


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [ShortMethod, FlipMethod]
