"""The library's exceptions: every failure surfaces as one of these.

A leaf module: everyone may import it, it imports nothing of the package.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from collections.abc import Iterable as _Iterable


class MultiFDError(Exception):
    """Base of every error this library raises."""


# --- configuration and plugins -------------------------------------------------------------


class ConfigError(MultiFDError, ValueError):
    """A bad argument from the embedding program (channel count, page size, block name, ...)."""


class PluginError(MultiFDError):
    """A compression plugin could not be used.

    What it is about, as far as known, so that an error about one method lists only the problems
    that may explain it: ``plugin`` (the entry point's name), ``distribution`` (its name, no
    version), and the method ``names`` (aliases included) and compression ``values`` involved.
    """

    def __init__(
        self,
        message: str,
        *,
        plugin: str | None = None,
        distribution: str | None = None,
        names: _Iterable[str] = (),
        values: _Iterable[int] = (),
    ) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.distribution = distribution
        self.names = frozenset(names)
        self.values = frozenset(values)


class PluginLoadError(PluginError):
    """A plugin's entry point failed to import or returned something unusable."""


class PluginConflictError(PluginError):
    """Two plugins claim the same compression value or name."""


class UnknownMethodError(PluginError, KeyError):
    """No installed plugin provides the requested compression method."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown compression method"


class MethodError(MultiFDError):
    """A compression method's own code failed: a plugin's bug, not the peer's fault.

    Either one of its calls (``send_setup``, ``send_prepare``, ``send_cleanup``, ``recv_setup``,
    ``recv_pages``, ``recv_cleanup``, ``payload_size``) raised an exception that is not one the
    contract lets it raise (the plugin's exception is then this one's ``__cause__``), or
    ``send_prepare`` made a payload outside the method's own ``payload_size`` bound (refused by
    the sender before it is sent). A :class:`DecompressionError` (any :class:`ProtocolError`)
    from ``recv_pages`` is the contract's way to refuse a corrupt payload: the peer's fault, it
    stays what it is. ``method`` names the method; ``channel`` and ``packet_num`` say where
    (``packet_num`` None outside a packet: setup, cleanup).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        channel: int | None = None,
        packet_num: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.channel = channel
        self.packet_num = packet_num

    @classmethod
    def raised(
        cls,
        method: str,
        call: str,
        exc: BaseException,
        *,
        channel: int | None = None,
        packet_num: int | None = None,
    ) -> MethodError:
        """The error for ``exc`` out of the method's ``call``; raise it ``from exc``."""
        detail = str(exc)
        what = f"{call} raised {type(exc).__name__}" + (f": {detail}" if detail else "")
        return cls(what, method=method, channel=channel, packet_num=packet_num)

    def located(self, *, channel: int | None = None, packet_num: int | None = None) -> MethodError:
        """Fill in where the error happened (keeps what is already known)."""
        if self.channel is None:
            self.channel = channel
        if self.packet_num is None:
            self.packet_num = packet_num
        return self

    def __str__(self) -> str:
        where = [f"method {self.method!r}"]
        if self.channel is not None:
            where.append(f"channel {self.channel}")
        if self.packet_num is not None:
            where.append(f"packet {self.packet_num}")
        return f"{', '.join(where)}: {self.message}"


# --- bad input from the peer ---------------------------------------------------------------


class ProtocolError(MultiFDError):
    """The peer sent something that breaks the protocol.

    ``channel`` is the multifd channel id (None for the main channel or before the handshake),
    ``packet_num`` the packet number of the offending packet when known.
    """

    def __init__(
        self,
        message: str,
        *,
        channel: int | None = None,
        packet_num: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.channel = channel
        self.packet_num = packet_num

    def __str__(self) -> str:
        where = []
        if self.channel is not None:
            where.append(f"channel {self.channel}")
        if self.packet_num is not None:
            where.append(f"packet {self.packet_num}")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def located(
        self, *, channel: int | None = None, packet_num: int | None = None
    ) -> ProtocolError:
        """Fill in where the error happened (keeps what is already known)."""
        if self.channel is None:
            self.channel = channel
        if self.packet_num is None:
            self.packet_num = packet_num
        return self


class BadMagic(ProtocolError):
    """Wrong magic number in an init packet, packet header or main stream."""


class BadVersion(ProtocolError):
    """Unsupported protocol or stream version."""


class BadFlags(ProtocolError):
    """Unknown flag bits in a packet header."""


class CompressionMismatch(ProtocolError):
    """A packet's compression bits differ from the negotiated method."""


class BadPagesAlloc(ProtocolError):
    """pages_alloc exceeds this side's maximum pages per packet."""


class BadNormalPages(ProtocolError):
    """normal_pages exceeds pages_alloc."""


class UnknownBlock(ProtocolError):
    """A packet or record names a RAM block this side does not have."""


class BadOffset(ProtocolError):
    """A page offset that is unaligned or outside its block."""


class BadPacketSize(ProtocolError):
    """next_packet_size inconsistent with the pages and method."""


class BadChannelId(ProtocolError):
    """A channel id outside 0..N-1."""


class DuplicateChannel(ProtocolError):
    """Two channels announced the same id."""


class UuidMismatch(ProtocolError):
    """A channel's uuid differs from the migration's."""


class DecompressionError(ProtocolError):
    """A payload that does not decompress to exactly the declared pages."""


class MainStreamError(ProtocolError):
    """A malformed main migration stream (QEMU's savevm format)."""


class TruncatedStream(MainStreamError):
    """The main stream ended in the middle of a record or section."""


class BlockMismatch(ProtocolError):
    """The source's block list does not fit the destination's blocks."""


class SyncError(ProtocolError):
    """Channels and the main stream disagree about sync rounds."""


class IntegrityError(ProtocolError):
    """What landed differs from what the source sent, though the stream's structure was valid:
    a packet's checksum over its pages as written (a broken method, bytes changed in flight),
    or a block's final content digest (``--verify``). ``block`` names the block; ``channel``
    and ``packet_num`` the packet, for a packet's checksum."""

    def __init__(
        self,
        message: str,
        *,
        block: str | None = None,
        channel: int | None = None,
        packet_num: int | None = None,
    ) -> None:
        super().__init__(message, channel=channel, packet_num=packet_num)
        self.block = block


# --- faults -------------------------------------------------------------------------------


class ChannelError(MultiFDError):
    """A channel failed: closed early, reset, or broken."""

    def __init__(self, message: str, *, channel: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.channel = channel

    def __str__(self) -> str:
        name = "main channel" if self.channel is None else f"channel {self.channel}"
        return f"{name}: {self.message}"


class ChannelClosed(ChannelError):
    """The peer closed a channel before the migration ended."""


class TLSError(ChannelError):
    """TLS failed on a channel: the message says why (certificate verify failed, hostname
    mismatch, missing client certificate, a peer that does not speak TLS, ...)."""


class MigrationTimeout(MultiFDError):
    """A wait on the peer exceeded its bound."""


class ChannelStalled(ChannelError, MigrationTimeout):
    """A channel moved no bytes for longer than the idle timeout while the peer owed some."""


class LimitExceeded(ProtocolError):
    """The peer asked for more than this side allows (blocks, sizes, names, total bytes)."""


class DestinationFailed(MultiFDError):
    """The destination said, on the return path, that the migration failed there: a SHUT with a
    non-zero ``shut_status``, or (``shut_status`` None) the return path ended without a SHUT."""

    def __init__(self, message: str, *, shut_status: int | None = None) -> None:
        super().__init__(message)
        self.shut_status = shut_status


class IncompleteMigration(MultiFDError):
    """The migration ended before every block was complete."""


class SnapshotError(MultiFDError):
    """A snapshot directory (``qemu_save``) that is missing files, or whose files do not match
    its manifest."""


class StorageError(MultiFDError):
    """Writing a receiver's file failed (ENOSPC, EDQUOT, EIO, EROFS, ENAMETOOLONG, ...), or its
    final name is taken: ``path`` names the file, ``errno`` the error, all in one line."""

    def __init__(self, path: str, err: int, action: str = "write") -> None:
        code = _errno.errorcode.get(err, str(err))
        super().__init__(f"cannot {action} {path}: {_os.strerror(err)} ({code})")
        self.path = path
        self.errno = err
