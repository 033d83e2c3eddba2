"""Files as RAM blocks: zero-copy mappings for ``multifd send`` and ``multifd recv``.

A file of any size becomes one block named after it. Its size is rounded up to whole pages: a
private mapping past the end of a file reads as zeros inside the last system page, so even the
tail needs no copy. The exact sizes travel in the main stream's JSON description after EOF
(QEMU's vmdesc slot), and the receiver cuts each file back to its exact size.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, ProtocolError
from .ram import RAMBlock
from .wire import encode_block_name

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_DONTNEED = 4

#: Data extents FileBlock.data_extents lists per window at most (two lseek calls each).
MAX_EXTENTS = 256


class _ReadOnlyMapping:
    """A read-only private mapping of ``length`` bytes of a file (length may pass its end within
    the last system page); exposes the buffer protocol through a ctypes array."""

    def __init__(self, fd: int, length: int) -> None:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap failed: {os.strerror(err)}")
        self.addr = addr
        self.length = length
        self.array = (ctypes.c_char * length).from_address(addr)

    def close(self) -> None:
        if self.addr is not None:
            _libc.munmap(self.addr, self.length)
            self.addr = None


class FileBlock(RAMBlock):
    """A source block mapping a file read-only; ``file_size`` is the exact size."""

    def __init__(self, name: str, path: str | os.PathLike[str], page_size: int = 4096) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.file_size = os.fstat(fd).st_size
            if self.file_size == 0:
                raise ConfigError(f"{os.fspath(path)}: empty file, nothing to migrate")
            length = -(-self.file_size // page_size) * page_size
            if length != self.file_size and page_size > mmap.PAGESIZE:
                raise ConfigError(
                    f"{os.fspath(path)}: size {self.file_size} is not a multiple of the "
                    f"page size {page_size}"
                )
            self._mapping = _ReadOnlyMapping(fd, length)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd  # kept for SEEK_DATA (data_extents); not RAMBlock.fd
        view = memoryview(self._mapping.array).cast("B").toreadonly()
        super().__init__(name, view, page_size)
        self.memory = self._mapping

    def close(self) -> None:
        self.host.release()
        self._mapping.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def data_extents(self, start: int, stop: int) -> list[tuple[int, int]] | None:
        """The file's data extents in pages ``[start, stop)`` (SEEK_DATA / SEEK_HOLE), rounded
        out to whole pages: the pages of a hole are zero and are never read. Reading them
        through the mapping would cost a page fault each, and on tmpfs allocate every one of
        them in the file (a sparse snapshot would grow to its full size). None where the file
        system cannot tell, or past MAX_EXTENTS extents (finely fragmented: cheaper to read)."""
        fd = self._fd
        if fd is None:
            return None
        ps = self.page_size
        pos, end = start * ps, min(stop * ps, self.file_size)
        extents: list[tuple[int, int]] = []
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from pos to the end of the file
                    break
                return None  # EINVAL: SEEK_DATA not supported here
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            if len(extents) == MAX_EXTENTS:
                return None
            extents.append((max(data // ps, start), min(-(-hole // ps), stop)))
            pos = hole
        return extents

    def release(self, start: int, end: int) -> None:
        """Drop the sent pages from this process (MADV_DONTNEED): the mapping is private and
        never written, so reading them again only faults them back in from the page cache.
        The sender's memory stays a few windows, whatever the file size."""
        addr = self._mapping.addr
        if addr is not None and end > start:
            start -= start % mmap.PAGESIZE
            _libc.madvise(addr + start, min(end, self._mapping.length) - start, _MADV_DONTNEED)


def block_name_for(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    encode_block_name(name)
    return name


def safe_output_path(directory: Path, name: str) -> Path:
    """Where block ``name`` goes in ``directory``; refuses names that would escape it."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ProtocolError(f"block name {name!r} cannot be a file name")
    return directory / name


def files_description(blocks: list[FileBlock]) -> bytes:
    return json.dumps({"multifd-files": {b.name: b.file_size for b in blocks}}).encode()


def parse_files_description(data: bytes | None) -> dict[str, int]:
    if not data:
        return {}
    try:
        desc: Any = json.loads(data)
        sizes = desc.get("multifd-files", {})
        return {str(k): int(v) for k, v in sizes.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ProtocolError(f"bad file description after EOF: {exc}") from exc
