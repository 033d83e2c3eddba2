"""A receiver's output directory: every file made safely inside it, kept only when all is done.

``multifd recv`` and ``multifd qemu-save`` listen on the network and write files; a peer or a
local user must not be able to turn them against the host. So in :class:`OutputDir`:

- the directory is opened once, and every file is made relative to that descriptor
  (``dir_fd``): a DIR replaced by a symlink meanwhile changes nothing;
- every file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a temporary name this
  process makes up (``.multifd-<random>.part``: never derived from a peer's name, and no
  block's final name starts with a dot), so nothing outside DIR is ever opened for writing and
  no existing file is ever truncated;
- a final name that already exists is refused when it is claimed, before any data moves,
  unless ``overwrite`` (then the rename replaces the name itself, never what a symlink there
  points to);
- :meth:`OutputDir.commit` fsyncs every file, renames them all to their final names (in the
  order they were made: a manifest made last lands last), then with ``fsync`` the directory;
- :meth:`OutputDir.discard` removes every file this process made, and only those (a name is
  unlinked only while it is still the file made here: same device and inode).

Every failing system call becomes a :class:`StorageError` naming the file and the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from .errors import StorageError

_T = TypeVar("_T")
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
#: bytes written per call by OutputDir.write
WRITE_CHUNK = 1 << 20


@dataclass
class Temp:
    """One file made in the directory: its temporary name, its final one, its descriptor."""

    name: str
    final: str
    fd: int
    ino: tuple[int, int]  # (st_dev, st_ino): the file this process made
    renamed: bool = False


class OutputDir:
    """The files of one receiver in ``path`` (made if missing)."""

    def __init__(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.fsync = fsync
        self.temps: list[Temp] = []
        self._claimed: set[str] = set()
        self.fd = -1
        self.fd = self._call(str(self.path), "open the directory", self._open_dir)

    def _open_dir(self) -> int:
        self.path.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def label(self, name: str) -> str:
        """A file's path, for messages."""
        return str(self.path / name)

    def call(self, name: str, action: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, its OSError a StorageError naming file ``name`` of the directory."""
        return self._call(self.label(name), action, fn)

    def _call(self, path: str, action: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except OSError as exc:
            raise StorageError(path, exc.errno or errno.EIO, action) from exc

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(self.label(name), exc.errno or errno.EIO, "look up") from exc
        return True

    def claim(self, final: str) -> None:
        """Reserve ``final`` for a file of this run: refused when it exists (unless overwrite)."""
        if not self.overwrite and self.exists(final):
            raise StorageError(self.label(final), errno.EEXIST, "replace (--overwrite to allow)")
        self._claimed.add(final)

    def create(self, final: str) -> Temp:
        """A new empty file under a temporary name, to become ``final`` on commit."""
        if any(temp.final == final for temp in self.temps):
            raise StorageError(self.label(final), errno.EEXIST, "create twice")
        if final not in self._claimed:
            self.claim(final)
        while True:
            name = f".multifd-{secrets.token_hex(8)}.part"
            try:
                fd = os.open(name, _CREATE, 0o644, dir_fd=self.fd)
            except FileExistsError:
                continue  # 2**64 names: someone made this one; never touch it
            except OSError as exc:
                self._claimed.discard(final)
                raise StorageError(self.label(name), exc.errno or errno.EIO, "create") from exc
            st = os.fstat(fd)
            temp = Temp(name, final, fd, (st.st_dev, st.st_ino))
            self.temps.append(temp)
            return temp

    def write(self, final: str, data: bytes) -> Temp:
        """A new file holding ``data``, to become ``final`` on commit."""
        temp = self.create(final)
        view = memoryview(data)

        def write_all() -> None:
            done = 0
            while done < len(view):
                done += os.write(temp.fd, view[done : done + WRITE_CHUNK])

        self._call(self.label(temp.name), "write", write_all)
        return temp

    def truncate(self, temp: Temp, size: int) -> None:
        self._call(self.label(temp.name), "truncate", lambda: os.ftruncate(temp.fd, size))

    def commit(self) -> None:
        """Everything is written and verified: fsync each file, rename each to its final name,
        then (with ``fsync``) the directory. On a failure, the files already renamed are
        removed again (they are this run's)."""
        for temp in self.temps:
            self.call(temp.name, "fsync", partial(os.fsync, temp.fd))
        for temp in self.temps:
            self.call(temp.final, "rename into", partial(self._rename, temp))
            temp.renamed = True
        if self.fsync:
            self._call(str(self.path), "fsync", lambda: os.fsync(self.fd))
        self._close_files()

    def _rename(self, temp: Temp) -> None:
        if self.overwrite or _renameat2 is None:
            if not self.overwrite and self.exists(temp.final):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
            os.rename(temp.name, temp.final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            return
        src, dst = os.fsencode(temp.name), os.fsencode(temp.final)
        if _renameat2(self.fd, src, self.fd, dst, _RENAME_NOREPLACE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _is_ours(self, name: str, temp: Temp) -> bool:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == temp.ino

    def drop(self, temp: Temp) -> None:
        """Remove one file of this run (a failure: its temporary or, once renamed, final name)."""
        name = temp.final if temp.renamed else temp.name
        if self._is_ours(name, temp):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
        with contextlib.suppress(OSError):
            os.close(temp.fd)
        temp.fd = -1

    def discard(self) -> None:
        """The migration failed: remove every file this run made, and nothing else."""
        for temp in self.temps:
            self.drop(temp)
        self.temps = []

    def _close_files(self) -> None:
        for temp in self.temps:
            if temp.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(temp.fd)
                temp.fd = -1

    def close(self) -> None:
        """Close every descriptor (files of a commit stay, temporary ones are not removed)."""
        self._close_files()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


__all__ = ["OutputDir", "Temp", "WRITE_CHUNK"]
