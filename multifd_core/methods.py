"""Compression methods: the base classes plugins implement.

QEMU's ``MultiFDMethods`` table (send_setup/send_prepare/send_cleanup, recv_setup/recv_pages/
recv_cleanup) becomes a method class per 3-bit compression value, creating one send context and
one receive context per channel. ``registry.py`` finds the installed ones. A leaf module of the
package but for the errors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from .errors import ConfigError, DecompressionError

Buffer = bytes | bytearray | memoryview


def scatter(data: Buffer, pages: Sequence[memoryview]) -> None:
    """Copy ``data`` into ``pages`` in order, each filled exactly (memoryview copies in C).

    The tail of ``recv_pages`` for a codec that decodes a packet into one buffer; the caller has
    checked that ``len(data)`` is the pages' total length.
    """
    if len(pages) == 1:
        pages[0][:] = data
        return
    view = memoryview(data)
    pos = 0
    for page in pages:
        end = pos + len(page)
        page[:] = view[pos:end]
        pos = end


def int_option(
    options: dict[str, Any], method: str, name: str, default: int, low: int, high: int
) -> int:
    """Take option ``name`` out of ``options`` (an int, or a string from the CLI's ``-o``) as an
    integer in ``low..high`` (``default`` when absent); ConfigError naming ``method`` otherwise."""
    raw = options.pop(name, default)
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ConfigError(f"{method} option {name}={raw!r} is not an integer")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{method} option {name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{method} option {name}={value} is outside {low}..{high}")
    return value


class SendContext:
    """Per-channel send state (QEMU: MultiFDSendParams.data). May run in a worker thread."""

    def send_prepare(self, pages: Sequence[memoryview]) -> Sequence[Buffer]:
        """Return the payload of one packet holding ``pages`` (the parts are sent in order)."""
        raise NotImplementedError

    def send_cleanup(self) -> None:
        """Release resources; called once when the channel ends, whatever the reason."""


class RecvContext:
    """Per-channel receive state (QEMU: MultiFDRecvParams.data). May run in a worker thread."""

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        """Decode ``payload`` into ``pages``, filling exactly their bytes.

        Must never produce more than ``sum(len(p) for p in pages)`` bytes, and must raise
        :class:`multifd_core.DecompressionError` when the payload is corrupt, truncated, too long
        or decodes to any other size.
        """
        raise NotImplementedError

    def recv_cleanup(self) -> None:
        """Release resources; called once when the channel ends, whatever the reason."""


class StreamSend(SendContext):
    """The send side of a codec keeping one compression stream for the channel's life (QEMU's
    zlib and zstd): each packet is its pages through ``stream.compress``, then one
    ``stream.flush(flush_mode)`` that ends the packet on a byte boundary."""

    def __init__(self, method: str, stream: Any, flush_mode: int) -> None:
        self.method = method
        self._c: Any = stream
        self.flush_mode = flush_mode

    def send_prepare(self, pages: Sequence[memoryview]) -> Sequence[Buffer]:
        c = self._c
        if c is None:
            raise RuntimeError(f"{self.method} send context used after send_cleanup")
        parts: list[Buffer] = []
        for page in pages:
            out = c.compress(page)
            if out:
                parts.append(out)
        parts.append(c.flush(self.flush_mode))
        return parts

    def send_cleanup(self) -> None:
        self._c = None


class StreamRecv(RecvContext):
    """The receive side of a per-channel stream: ``decode`` fills the pages from one payload.
    Once a payload fails, the stream's state is unknown: every later payload is refused with
    the first error."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._broken: str | None = None

    def recv_pages(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        if self._broken is not None:
            raise DecompressionError(
                f"{self.method} stream unusable after an earlier error: {self._broken}"
            )
        try:
            self.decode(payload, pages)
        except DecompressionError as exc:
            self._broken = exc.message
            raise

    def decode(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
        """Decode ``payload`` into ``pages`` (the contract of ``recv_pages``)."""
        raise NotImplementedError


class MultiFDMethod(ABC):
    """A compression method. Subclass it, set ``name`` and ``value``, and publish it from a
    ``multifd_methods`` hook implementation.

    Options (``level=3`` and the like) arrive as keyword strings from the API or CLI; a method
    converts and validates them in ``__init__`` and raises ConfigError when they are bad.
    """

    #: The name users pick it by (QEMU's multifd-compression values: none, zlib, zstd).
    name: ClassVar[str]
    #: The 3-bit compression value in the packet flags (flags = value << 1).
    value: ClassVar[int]
    #: Other names accepted for it.
    aliases: ClassVar[tuple[str, ...]] = ()
    #: True when the payload is the pages themselves (the engine then moves it zero-copy).
    raw_payload: ClassVar[bool] = False
    #: True to run send_prepare / recv_pages in a worker thread (C code releasing the GIL).
    threaded: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"method {self.name!r} takes no options, got {sorted(options)}")
        self.options: dict[str, Any] = {}

    def payload_size(self, raw_len: int) -> tuple[int, int]:
        """The (min, max) next_packet_size a receiver accepts for ``raw_len`` bytes of pages."""
        if self.raw_payload:
            return raw_len, raw_len
        return 1, raw_len + raw_len // 8 + 4096

    @abstractmethod
    def send_setup(self, channel: int) -> SendContext:
        """Create the send state of channel ``channel``."""

    @abstractmethod
    def recv_setup(self, channel: int) -> RecvContext:
        """Create the receive state of channel ``channel``."""

    @property
    def flags(self) -> int:
        return self.value << 1


__all__ = [
    "Buffer",
    "MultiFDMethod",
    "RecvContext",
    "SendContext",
    "StreamRecv",
    "StreamSend",
    "int_option",
    "scatter",
]
