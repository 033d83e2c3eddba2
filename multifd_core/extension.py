"""The multifd-py extension: what our own ends add to QEMU's wire, in bytes QEMU reserves.

Sans-I/O, as wire.py (which uses and re-exports these names): the announcement in the init
packet's ``unused2`` (marker, version, feature bits, and the pages per packet), and the
checksum field of a packet header. The layout, the rules and their reasons:
docs/wire-extensions.md.
"""

from __future__ import annotations

import struct

from .errors import BadFlags, BadPagesAlloc, BadVersion, ConfigError

# --- the multifd-py extension (between our own ends; docs/wire-extensions.md) ---------------
#
# A QEMU peer never reads these bytes: QEMU 7.2 and 10.0 write zeros there and ignore them. So
# zeros (a QEMU source, or ours with integrity off) mean "no extension", and only the marker
# with a known version turns a feature on.

#: In MultiFDInit_t's unused2[0] (bytes 32..35): the extension is present.
MULTIFD_EXT_MARKER = b"MFPY"
#: The extension's layout version (bytes 36..37); any other version is refused.
MULTIFD_EXT_VERSION = 1
#: Feature bit (bytes 38..39): every packet on the channel carries MULTIFD_EXT_CHECKSUM_AT.
MULTIFD_EXT_PACKET_CHECKSUM = 1 << 0
#: Feature bit: the channel's packets have room for the pages the init packet says at
#: MULTIFD_EXT_PAGES_AT (a be32), not QEMU's MULTIFD_PACKET_SIZE worth: its headers are
#: ``packet_header_size`` of that many.
MULTIFD_EXT_PACKET_PAGES = 1 << 1
MULTIFD_EXT_KNOWN_FEATURES = MULTIFD_EXT_PACKET_CHECKSUM | MULTIFD_EXT_PACKET_PAGES
#: The most pages a packet of our own ends may hold (MULTIFD_EXT_PACKET_PAGES): a 128 KiB header.
MAX_PACKET_PAGES = 1 << 14
#: Where the init packet says how many pages its channel's packets hold (unused2[1]).
MULTIFD_EXT_PAGES_AT = 40
_INIT_PAGES = struct.Struct(">I")
#: marker, version, feature bits: in the init packet's unused2[0] (bytes 32..39)
_INIT_EXT = struct.Struct(">4sHH")
_INIT_EXT_AT = 32
#: Where a packet's checksum sits: a be64 in the bytes neither QEMU uses (7.2's unused[1],
#: 10.0's unused64[0]); see integrity.py for what it covers.
MULTIFD_EXT_CHECKSUM_AT = 40
_CHECKSUM = struct.Struct(">Q")


def pack_init_extension(buf: bytearray, features: int, packet_pages: int = 0) -> None:
    """Write the announcement of ``features`` (and ``packet_pages``) into an encoded init
    packet; nothing for no features (QEMU's zeros)."""
    if features & ~MULTIFD_EXT_KNOWN_FEATURES:
        raise ConfigError(f"unknown multifd-py extension features {features:#x}")
    if not features:
        return
    _INIT_EXT.pack_into(buf, _INIT_EXT_AT, MULTIFD_EXT_MARKER, MULTIFD_EXT_VERSION, features)
    if features & MULTIFD_EXT_PACKET_PAGES:
        if not 0 < packet_pages <= MAX_PACKET_PAGES:
            raise ConfigError(f"packet_pages {packet_pages} outside 1..{MAX_PACKET_PAGES}")
        _INIT_PAGES.pack_into(buf, MULTIFD_EXT_PAGES_AT, packet_pages)


def unpack_init_extension(buf: bytes | bytearray | memoryview, chan_id: int) -> tuple[int, int]:
    """The feature bits and the pages per packet (0: QEMU's) an init packet announces."""
    features = _features(buf, chan_id)
    return features, _packet_pages(buf, chan_id, features)


def _packet_pages(buf: bytes | bytearray | memoryview, chan_id: int, features: int) -> int:
    """The pages per packet an init packet announces (MULTIFD_EXT_PACKET_PAGES); 0: none."""
    if not features & MULTIFD_EXT_PACKET_PAGES:
        return 0
    pages = int(_INIT_PAGES.unpack_from(buf, MULTIFD_EXT_PAGES_AT)[0])
    if not 0 < pages <= MAX_PACKET_PAGES:
        raise BadPagesAlloc(
            f"channel {chan_id}: packets of {pages} pages announced, outside 1..{MAX_PACKET_PAGES}"
        )
    return pages


def _features(buf: bytes | bytearray | memoryview, chan_id: int) -> int:
    """The extension's feature bits in an init packet: 0 without the marker (QEMU's zeros)."""
    marker, version, features = _INIT_EXT.unpack_from(buf, _INIT_EXT_AT)
    if marker != MULTIFD_EXT_MARKER:
        return 0
    if version != MULTIFD_EXT_VERSION:
        raise BadVersion(
            f"channel {chan_id}: multifd-py extension version {version}, "
            f"expected {MULTIFD_EXT_VERSION}"
        )
    if features & ~MULTIFD_EXT_KNOWN_FEATURES:
        raise BadFlags(
            f"channel {chan_id}: unknown multifd-py extension features "
            f"{features & ~MULTIFD_EXT_KNOWN_FEATURES:#x}"
        )
    return int(features)


def packet_checksum(header: bytes | bytearray | memoryview) -> int:
    """The checksum field of a packet header (meaningful on a channel that announced
    MULTIFD_EXT_PACKET_CHECKSUM)."""
    return int(_CHECKSUM.unpack_from(header, MULTIFD_EXT_CHECKSUM_AT)[0])


def set_packet_checksum(header: bytearray, value: int) -> None:
    """Write ``value`` into the checksum field of an encoded packet header."""
    _CHECKSUM.pack_into(header, MULTIFD_EXT_CHECKSUM_AT, value)


__all__ = [
    "MAX_PACKET_PAGES",
    "MULTIFD_EXT_CHECKSUM_AT",
    "MULTIFD_EXT_KNOWN_FEATURES",
    "MULTIFD_EXT_MARKER",
    "MULTIFD_EXT_PACKET_CHECKSUM",
    "MULTIFD_EXT_PACKET_PAGES",
    "MULTIFD_EXT_PAGES_AT",
    "MULTIFD_EXT_VERSION",
    "pack_init_extension",
    "packet_checksum",
    "set_packet_checksum",
    "unpack_init_extension",
]
