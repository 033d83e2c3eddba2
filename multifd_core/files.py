"""Files as RAM blocks: mappings for ``multifd send``, and the files ``multifd recv`` makes.

A file of any size becomes one block named after it. Its size is rounded up to whole pages: a
private mapping past the end of a file reads as zeros inside the last system page, so even the
tail needs no copy. The exact sizes travel in the main stream's JSON description after EOF
(QEMU's vmdesc slot), and the receiver cuts each file back to its exact size.

The receiver stores each block under the file name :func:`file_name_for` gives (any name QEMU
can send, ``/rom@etc/acpi/tables`` included), and writes a manifest (:data:`MANIFEST`) of block
names, sizes and files: :class:`ReceivedFiles`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ProtocolError
from .outdir import OutputDir, Temp
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
    """A source block mapping a file read-only; ``file_size`` is the exact size.

    Not ``live``: the file must not change while it is sent (nothing marks its pages dirty);
    its packets are hashed and sent straight from the mapping, without a copy, and a write to
    the file meanwhile ends the migration with IntegrityError at the destination."""

    live = False

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

    def content_fd(self) -> int | None:
        return self._fd  # read with pread: never faults in the private mapping

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


def files_description(blocks: list[FileBlock]) -> bytes:
    return json.dumps({"multifd-files": {b.name: b.file_size for b in blocks}}).encode()


def _description(data: bytes | None) -> Any:
    """The source's JSON description after EOF, parsed; None when it sent none."""
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"bad file description after EOF: {exc}") from exc


def _file_sizes(description: Any) -> dict[str, int]:
    """The exact file sizes ``multifd send`` gives in its description (``multifd-files``)."""
    if description is None:
        return {}
    try:
        sizes = description.get("multifd-files", {})
        out = {str(k): v for k, v in sizes.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ProtocolError(f"bad file description after EOF: {exc}") from exc
    for name, size in out.items():
        if type(size) is not int:  # not a float, a string or a bool
            raise ProtocolError(f"bad file description after EOF: size {size!r} of {name!r}")
    return out


# --- block names as file names ------------------------------------------------------------

#: bytes in one file name (Linux's NAME_MAX, and that of every common file system)
NAME_MAX = 255
#: between the readable prefix and the digest of a name too long to escape in full
DIGEST_MARK = "%+"
_DIGEST_HEX = 64  # hex digits of a SHA-256
_PREFIX_MAX = NAME_MAX - len(DIGEST_MARK) - _DIGEST_HEX
#: escaped wherever they are: the escape itself, the separator, the controls (Unicode's Cc)
_ALWAYS = re.compile(r"[%/\x00-\x1f\x7f-\x9f]")
_ESCAPED = re.compile(r"(?:[^%]|%[0-9A-F]{2})+")
_DIGEST_NAME = re.compile(r"(.+)%\+[0-9a-f]{64}")
#: the rule in one line, for the manifest
FILE_NAMES = (
    "block name with '%', '/', U+0001-U+001F, U+007F-U+009F and a leading '.' as %XX "
    "(upper-case hex, one a UTF-8 byte); past 255 bytes: its first 189 bytes or fewer "
    "(whole characters), '%+', the SHA-256 of the block name (UTF-8) in lower-case hex"
)


def _escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode())


def _units(name: str) -> list[str]:
    """The name character by character: kept, or replaced by its escape."""
    return [
        _escape(c) if _ALWAYS.match(c) or (i == 0 and c == ".") else c for i, c in enumerate(name)
    ]


def file_name_for(name: str) -> str:
    """The file that holds block ``name`` in ``multifd recv``'s directory, exactly:

    1. Each character of the name stays as it is, except these, which become the RFC 3986
       percent-encoding of their UTF-8 bytes (``%`` and two upper-case hex digits a byte):
       ``%`` (the escape itself), ``/``, the control characters U+0001-U+001F, U+007F and
       U+0080-U+009F (Unicode's category Cc, a set that never changes), and ``.`` when it is
       the first character (no ``.``, ``..`` or hidden file: names starting with a dot are the
       receiver's own, as :data:`MANIFEST`).
    2. That is the file name if it is at most :data:`NAME_MAX` (255) bytes of UTF-8:
       ``urllib.parse.unquote`` (or :func:`block_name_from_file`) gives the block name back.
    3. Else (a name of up to 255 bytes can grow to 765): its longest prefix of whole
       characters or escapes within 189 bytes, then ``%+``, then the SHA-256 of the block name's
       UTF-8 bytes in 64 lower-case hex digits: 255 bytes at most. A rule-2 name never holds
       ``%+``, so the two kinds never meet; the manifest maps these files to their blocks.

    So a name that already is a plain file name (``disk.img``, ``a.part``, ``pc.ram``,
    ``my disk.img``, ``été.img``) is unchanged, case and all; ``/rom@etc/acpi/tables`` is
    ``%2From@etc%2Facpi%2Ftables``. A name-only scheme cannot do without rule 3: there are more
    block names of each length than file names free of ``/`` and controls, so no such mapping
    into 255 bytes is one-to-one. ConfigError for an invalid block name (see wire.py).

    Why this rule: percent-encoding is the most widely decodable escape (every URL library),
    and escaping only what is unsafe in a Linux file name keeps every name that already is a
    plain one as it is. systemd-escape would not: it escapes ``-``, spaces and every byte
    outside ASCII (``my disk.img`` becomes ``my\\x20disk.img``), and RFC 3986's full reserved
    set would escape ``@``, ``:`` and spaces as well.
    """
    encode_block_name(name)  # 1..255 bytes of UTF-8, no NUL
    units = _units(name)
    escaped = "".join(units)
    if len(escaped.encode()) <= NAME_MAX:
        return escaped
    prefix: list[str] = []
    used = 0
    for unit in units:
        used += len(unit.encode())
        if used > _PREFIX_MAX:
            break
        prefix.append(unit)
    return "".join(prefix) + DIGEST_MARK + hashlib.sha256(name.encode()).hexdigest()


def block_name_from_file(file: str) -> str | None:
    """The block whose file :func:`file_name_for` names ``file``; None for a digest name (rule
    3: look it up in the manifest). ValueError for a name that file_name_for never gives."""
    digest = _DIGEST_NAME.fullmatch(file)
    if digest is not None and _ESCAPED.fullmatch(digest.group(1)):
        return None
    if not _ESCAPED.fullmatch(file):
        raise ValueError(f"{file!r} is not a block's file name")
    name = urllib.parse.unquote_to_bytes(file).decode("utf-8")  # UnicodeDecodeError: ValueError
    if file_name_for(name) != file:  # not the one spelling rule 1 gives (%41 for A, say)
        raise ValueError(f"{file!r} is not a block's file name")
    return name


# --- the receiver's directory -------------------------------------------------------------

#: The manifest ``multifd recv`` writes in its directory once every file is in place. It starts
#: with a dot, as no block's file does (rule 1 of file_name_for).
MANIFEST = ".multifd-recv.json"
MANIFEST_FORMAT = "multifd-recv/1"


@dataclass
class _Received:
    """One block of a ReceivedFiles, and its file."""

    block: RAMBlock
    file: str  # its name in the directory once the migration completed
    temp: Temp  # the file until then, under a name of the receiver's own (outdir.py)

    @property
    def part(self) -> str:
        return self.temp.name


class ReceivedFiles:
    """The files of one ``multifd recv`` in ``directory``: one a block, named by
    :func:`file_name_for`, made as :class:`OutputDir` makes files (relative to the directory's
    descriptor, O_EXCL | O_NOFOLLOW, under a temporary name of its own that is never a block's
    file: those never start with a dot). A block's file that exists already is refused when the
    block list arrives, before any page, unless ``overwrite``. :meth:`commit` checks the sizes
    of the description, cuts the files to them, then renames them all and the manifest, last;
    :meth:`discard` removes every file this run made, and nothing else."""

    def __init__(self, directory: Path, *, overwrite: bool = False, fsync: bool = False) -> None:
        self.directory = directory
        self.out = OutputDir(directory, overwrite=overwrite, fsync=fsync)
        self.received: dict[str, _Received] = {}
        self.max_size: int | None = None  # --max-size: no file size after EOF beyond it

    def block_factory(self, name: str, size: int, page_size: int) -> RAMBlock:
        """The destination's ``block_factory``: a block mapping its temporary file."""
        file = file_name_for(name)
        for other, got in self.received.items():
            if got.file == file:
                raise ProtocolError(f"blocks {other!r} and {name!r} would be one file {file!r}")
        temp = self.out.create(file)
        try:
            fd = os.dup(temp.fd)
            block = RAMBlock.from_file(
                name, self.out.label(temp.name), size, page_size, create=True, fd=fd
            )
        except BaseException:
            self.out.drop(temp)
            self.out.temps.remove(temp)
            raise
        self.received[name] = _Received(block, file, temp)
        return block

    def paths(self) -> dict[str, str]:
        """Each block's file, by block name."""
        return {name: str(self.directory / got.file) for name, got in self.received.items()}

    def commit(self, description: bytes | None) -> dict[str, Any]:
        """The migration completed: check every size the source's ``description`` gives
        (``multifd send`` gives them) before any file changes, cut each file to its size, and
        rename them all to their final names, the manifest last, so that it is there only when
        every file is. Returns the manifest."""
        desc = _description(description)
        sizes = _file_sizes(desc)
        blocks = [
            _entry(name, got, sizes.get(name), self.max_size) for name, got in self.received.items()
        ]
        for got, entry in zip(self.received.values(), blocks, strict=True):
            got.block.close()
            if entry["size"] != entry["block-size"]:
                self.out.truncate(got.temp, entry["size"])
        manifest = {
            "format": MANIFEST_FORMAT,
            "file-names": FILE_NAMES,
            "blocks": blocks,
            "description": desc,
        }
        self.out.write(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        self.out.commit()
        self.out.close()
        return manifest

    def discard(self) -> None:
        """The migration failed: remove every file this run made."""
        for got in self.received.values():
            # the error on its way out may still hold views of the mapping (frames of the
            # channel tasks): then the mmap stays open until exit, but the file must go
            with contextlib.suppress(BufferError, ValueError):
                got.block.close()
        self.out.discard()
        self.out.close()


def _entry(name: str, got: _Received, size: int | None, limit: int | None) -> dict[str, Any]:
    """A block's line in the manifest; ``size`` is its file's size from the description."""
    block_size = got.block.size
    if size is None:
        size = block_size
    elif not 0 < size <= block_size or (limit is not None and size > limit):
        raise ProtocolError(
            f"the source gives block {name!r} of {block_size} bytes a file size of {size}"
        )
    return {"name": name, "file": got.file, "size": size, "block-size": block_size}
