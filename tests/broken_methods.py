"""Broken compression methods, on nocomp's contexts (the pages as the payload).

Two break ``recv_pages``'s contract without a word: they fill the pages and then leave one byte
unwritten (``short``) or flip one (``flipbyte``). The stream's structure stays valid; only the
integrity checks can tell (tests/test_integrity.py). One is a plugin's bug that shows
(``raising``): its option ``fail`` names the call that raises a ValueError (``send_setup``,
``send_prepare``, ``send_cleanup``, ``recv_setup``, ``recv_pages``, ``recv_cleanup``,
``payload_size``), or ``oversize`` for a ``send_prepare`` whose payload outgrows the method's
``payload_size`` bound; ``after`` calls succeed first (tests/test_method_errors.py). Used in
process, and as an installed plugin in ``multifd`` subprocesses
(``procs.plugin_site(root, "broken_methods")``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from multifd_core import MultiFDMethod, RecvContext, SendContext, hookimpl, int_option
from multifd_core.errors import ConfigError
from multifd_core.methods import Buffer
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


FAILING_CALLS = frozenset(
    {
        "send_setup",
        "send_prepare",
        "send_cleanup",
        "recv_setup",
        "recv_pages",
        "recv_cleanup",
        "payload_size",
        "oversize",
    }
)


class Failing:
    """Counts the calls of one kind; the one after ``after`` successful ones fails."""

    def __init__(self, method: RaisingMethod, call: str) -> None:
        self.armed = method.fail == call
        self.left = method.after

    def now(self) -> bool:
        if not self.armed:
            return False
        self.left -= 1
        return self.left < 0


class RaisingSend(NocompSend):
    def __init__(self, method: RaisingMethod) -> None:
        self.raising = Failing(method, "send_prepare")
        self.oversize = Failing(method, "oversize")
        self.cleanup = Failing(method, "send_cleanup")

    def send_prepare(self, pages: Sequence[memoryview]) -> Sequence[Buffer]:
        if self.raising.now():
            raise ValueError("send_prepare is broken")
        if self.oversize.now():  # past the default bound: raw + raw // 8 + 4096
            raw = sum(len(p) for p in pages)
            return [*pages, bytes(raw // 8 + 4097)]
        return pages

    def send_cleanup(self) -> None:
        if self.cleanup.now():
            raise ValueError("send_cleanup is broken")


class RaisingRecv(NocompRecv):
    def __init__(self, method: RaisingMethod) -> None:
        self.raising = Failing(method, "recv_pages")
        self.cleanup = Failing(method, "recv_cleanup")

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        if self.raising.now():
            raise ValueError("recv_pages is broken")
        super().recv_pages(payload, pages)

    def recv_cleanup(self) -> None:
        if self.cleanup.now():
            raise ValueError("recv_cleanup is broken")


class RaisingMethod(MultiFDMethod):
    """Options ``fail=CALL`` (one of FAILING_CALLS; none: a sound method) and ``after=N``."""

    name = "raising"
    value = 5
    threaded = True

    def __init__(self, **options: Any) -> None:
        fail = options.pop("fail", None)
        after = int_option(options, self.name, "after", 0, 0, 1 << 20)
        super().__init__(**options)
        if fail is not None and fail not in FAILING_CALLS:
            raise ConfigError(f"raising option fail={fail!r} is not one of {sorted(FAILING_CALLS)}")
        self.fail, self.after = fail, after
        self.payload_size_calls = Failing(self, "payload_size")

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        if self.payload_size_calls.now():
            raise ValueError("payload_size is broken")
        return super().payload_size(raw_len)

    def send_setup(self, channel: int) -> SendContext:
        if self.fail == "send_setup" and channel >= self.after:
            raise ValueError("send_setup is broken")
        return RaisingSend(self)

    def recv_setup(self, channel: int) -> RecvContext:
        if self.fail == "recv_setup" and channel >= self.after:
            raise ValueError("recv_setup is broken")
        return RaisingRecv(self)


class RaisingInline(RaisingMethod):
    """The same, its calls on the event loop (not registered)."""

    name = "raising-inline"
    threaded = False


@hookimpl
def multifd_methods() -> Iterable[type[MultiFDMethod]]:
    return [ShortMethod, FlipMethod, RaisingMethod]
