"""The configuration record after the file header: the machine type and its subsections.

QEMU writes it as a vmstate (savevm.c's ``vmstate_configuration``): a be32-counted machine type,
then optional subsections, each ``QEMU_VM_SUBSECTION``, a u8-counted name, a be32 version and
a body. :data:`SUBSECTIONS` is the table of the subsections known here, name to reader: a new
one is a row and a reader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, TypeAlias

from ..errors import MainStreamError
from .constants import (
    BE32,
    MAX_CAPABILITIES,
    MAX_MACHINE_TYPE,
    QEMU_VM_SUBSECTION,
    SUBSECTION_CAPABILITIES,
    SUBSECTION_TARGET_PAGE_BITS,
    SUBSECTION_UUID,
)
from .events import Configuration

__all__ = ["SUBSECTIONS", "read_configuration"]

Value: TypeAlias = int | bytes | tuple[str, ...]
#: A subsection body reader: (buffer, position, page size) -> (value, end), None while the body
#: is not all buffered; raises MainStreamError for a value this side refuses.
Reader: TypeAlias = Callable[[bytearray, int, int], "tuple[Value, int] | None"]


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MainStreamError(f"{what} {raw!r} is not UTF-8") from None


def _target_page_bits(buf: bytearray, p: int, page_size: int) -> tuple[Value, int] | None:
    if len(buf) - p < 4:
        return None
    (bits,) = BE32.unpack_from(buf, p)
    if bits >= 64 or 1 << bits != page_size:
        raise MainStreamError(
            f"source target page bits {bits}, but the page size here is {page_size}"
        )
    return bits, p + 4


def _uuid(buf: bytearray, p: int, page_size: int) -> tuple[Value, int] | None:
    if len(buf) - p < 16:
        return None
    return bytes(buf[p : p + 16]), p + 16


def _capabilities(buf: bytearray, p: int, page_size: int) -> tuple[Value, int] | None:
    end = len(buf)
    if end - p < 4:
        return None
    (count,) = BE32.unpack_from(buf, p)
    p += 4
    if count > MAX_CAPABILITIES:
        raise MainStreamError(
            f"configuration lists {count} capabilities, more than {MAX_CAPABILITIES}"
        )
    caps: list[str] = []
    for _ in range(count):
        if end - p < 1:
            return None
        clen = buf[p]
        if end - p < 1 + clen:
            return None
        caps.append(_decode(bytes(buf[p + 1 : p + 1 + clen]), "capability name"))
        p += 1 + clen
    if "x-ignore-shared" in caps:
        raise MainStreamError(
            "capability x-ignore-shared is not supported (it changes the block list)"
        )
    return tuple(caps), p


#: The configuration subsections QEMU 7.2 writes, by name, and their version.
SUBSECTIONS: Final[Mapping[str, tuple[int, Reader]]] = {
    SUBSECTION_TARGET_PAGE_BITS: (1, _target_page_bits),
    SUBSECTION_CAPABILITIES: (1, _capabilities),
    SUBSECTION_UUID: (1, _uuid),
}


def _machine_type(buf: bytearray, p: int) -> tuple[str, int] | None:
    if len(buf) - p < 4:
        return None
    (length,) = BE32.unpack_from(buf, p)
    if not 0 < length <= MAX_MACHINE_TYPE:
        raise MainStreamError(
            f"configuration machine type length {length} outside 1..{MAX_MACHINE_TYPE}"
        )
    p += 4
    if len(buf) - p < length:
        return None
    return _decode(bytes(buf[p : p + length]), "machine type"), p + length


def _subsection_head(
    buf: bytearray, p: int, seen: Mapping[str, Value]
) -> tuple[str, Reader, int] | None:
    """The subsection header at ``p`` (checked): its name, body reader and body position."""
    if len(buf) - p < 2:
        return None
    nlen = buf[p + 1]
    if len(buf) - p < 2 + nlen + 4:
        return None
    name = _decode(bytes(buf[p + 2 : p + 2 + nlen]), "subsection name")
    (version,) = BE32.unpack_from(buf, p + 2 + nlen)
    known = SUBSECTIONS.get(name)
    if known is None:
        raise MainStreamError(f"unknown configuration subsection {name!r}")
    if name in seen:
        raise MainStreamError(f"configuration subsection {name!r} appears twice")
    if version != known[0]:
        raise MainStreamError(
            f"configuration subsection {name!r} version {version}, not {known[0]}"
        )
    return name, known[1], p + 2 + nlen + 4


def read_configuration(buf: bytearray, p: int, page_size: int) -> tuple[Configuration, int] | None:
    """The configuration vmstate from ``p`` (after its QEMU_VM_CONFIGURATION byte) and its end;
    None if it is not all buffered yet.

    Its end is only known from the byte after it (a subsection or not), so that byte must be
    buffered too.
    """
    machine = _machine_type(buf, p)
    if machine is None:
        return None
    name, p = machine
    subsections: dict[str, Value] = {}
    while True:
        if len(buf) - p < 1:
            return None
        if buf[p] != QEMU_VM_SUBSECTION:
            return Configuration(name, subsections), p
        head = _subsection_head(buf, p, subsections)
        if head is None:
            return None
        sub, reader, p = head
        body = reader(buf, p, page_size)
        if body is None:
            return None
        subsections[sub], p = body
