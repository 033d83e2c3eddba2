"""``multifd recv`` stores any block name a source can send under a safe, reversible file name.

Sans-I/O: the encoding (``file_name_for`` / ``block_name_from_file``) with examples and
hypothesis properties over arbitrary valid block names; the receiver's directory
(``ReceivedFiles``) on a real temporary directory. End to end (about 1-2 s each): a library
source with QEMU's own block names into a ``multifd recv`` process over loopback TCP, and
``multifd send`` of files with awkward names into ``multifd recv``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from procs import finish, receiver, run

from multifd_core import ConfigError, ProtocolError, RAMBlock, open_source, tcp_connector
from multifd_core import files as files_module
from multifd_core.files import (
    MANIFEST,
    NAME_MAX,
    ReceivedFiles,
    block_name_from_file,
    file_name_for,
)
from multifd_core.testing import random_files

PS = 4096

# --- the encoding: examples ---------------------------------------------------------------

LONG_PLAIN = "b" * 251 + ".img"  # 255 bytes: a plain name as long as a name can be
LONG_SLASHES = "/" * 255  # 765 bytes escaped: a digest name

EXAMPLES = {
    # plain file names stay exactly as they are
    "disk.img": "disk.img",
    "a.part": "a.part",
    "pc.ram": "pc.ram",
    "pc.bios": "pc.bios",
    "Disk.IMG": "Disk.IMG",
    "my disk.img": "my disk.img",
    " spaced ": " spaced ",
    "été.img": "été.img",
    "日本語.img": "日本語.img",
    "a..b": "a..b",
    "x.": "x.",
    "-rf": "-rf",
    "multifd-recv.json": "multifd-recv.json",
    LONG_PLAIN: LONG_PLAIN,
    # QEMU's own names
    "/rom@etc/acpi/tables": "%2From@etc%2Facpi%2Ftables",
    "/rom@etc/table-loader": "%2From@etc%2Ftable-loader",
    "/rom@etc/acpi/rsdp": "%2From@etc%2Facpi%2Frsdp",
    "0000:00:02.0/vga.vram": "0000:00:02.0%2Fvga.vram",
    "0000:00:03.0/e1000.rom": "0000:00:03.0%2Fe1000.rom",
    # the escape, the separator, controls (C0, DEL, C1), a leading dot
    "50%.img": "50%25.img",
    "a%2Fb": "a%252Fb",
    "a/b": "a%2Fb",
    "/": "%2F",
    "new\nline": "new%0Aline",
    "tab\there": "tab%09here",
    "del\x7f": "del%7F",
    "c1\x85": "c1%C2%85",
    "\x9f": "%C2%9F",
    ".": "%2E",
    "..": "%2E.",
    "...": "%2E..",
    ".hidden": "%2Ehidden",
    ".multifd-recv.json": "%2Emultifd-recv.json",
    "./x": "%2E%2Fx",
    "../../etc/passwd": "%2E.%2F..%2Fetc%2Fpasswd",
}


@pytest.mark.parametrize(("name", "file"), EXAMPLES.items())
def test_examples(name: str, file: str) -> None:
    assert file_name_for(name) == file
    assert block_name_from_file(file) == name
    assert urllib.parse.unquote(file, errors="strict") == name  # any URL decoder does


def test_a_name_too_long_to_escape_becomes_prefix_mark_digest() -> None:
    file = file_name_for(LONG_SLASHES)
    digest = hashlib.sha256(LONG_SLASHES.encode()).hexdigest()
    assert file == "%2F" * 63 + "%+" + digest  # 189 bytes of prefix, whole escapes only
    assert len(file.encode()) == NAME_MAX
    assert block_name_from_file(file) is None  # its block name is in the manifest
    # one escape too many for 255 bytes: 253 plain bytes and one '/' make 256
    name = "c" * 253 + "/"
    assert "%+" in file_name_for(name)
    assert file_name_for("c" * 252 + "/") == "c" * 252 + "%2F"  # 255: still escaped in full


def test_the_prefix_is_cut_between_characters() -> None:
    name = "\x85" * 127  # 254 bytes; each character is 6 bytes escaped
    file = file_name_for(name)
    prefix = file.split("%+")[0]
    assert prefix == "%C2%85" * 31  # 186 bytes: a 32nd escape would pass 189
    assert urllib.parse.unquote(prefix, errors="strict") == "\x85" * 31


@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 128, "a\0b"])
def test_invalid_block_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        file_name_for(name)


@pytest.mark.parametrize(
    "file",
    [
        "",
        "a/b",
        "a\nb",
        ".hidden",
        "%41",  # 'A' spelt with an escape it never needs
        "%2f",  # lower-case hex
        "a%",
        "a%2",
        "%ZZ",
        "%C3",  # not UTF-8
        "%00",  # NUL: not in a block name
        "%2E%2E",  # '..' escapes only its first dot
        "%+" + "0" * 64,  # a digest with no prefix
        "x%+" + "0" * 63,  # a digest one digit short
    ],
)
def test_names_it_never_makes_do_not_decode(file: str) -> None:
    with pytest.raises(ValueError):
        block_name_from_file(file)


# --- the encoding: properties over every valid block name ----------------------------------

#: characters the encoding escapes, often, among any other character a name can hold
_AWKWARD = st.sampled_from("%/.\n\t\x01\x7f\x85\x9f +2FE")
_ANY_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")


def _at_most(limit: int) -> Any:
    """Cut a text to its first ``limit`` bytes of UTF-8, whole characters."""
    return lambda text: text.encode()[:limit].decode(errors="ignore")


_NAME_CHAR = st.one_of(_AWKWARD, _ANY_CHAR)
block_names = (
    st.one_of(
        st.text(_NAME_CHAR, min_size=1, max_size=255),
        st.text(_NAME_CHAR, min_size=100, max_size=255),  # long: digest names
        # near the edge: a long plain name and a few escapes, escaped in full or not
        st.builds(
            str.__add__,
            st.text(st.sampled_from("aé"), min_size=200, max_size=255),
            st.text(_AWKWARD, max_size=8),
        ),
    )
    .map(_at_most(255))
    .filter(bool)
)
#: names that are already plain file names
_PLAIN_CHAR = st.characters(
    blacklist_categories=("Cs", "Cc"), blacklist_characters="%/"
) | st.sampled_from(".-_ ")
plain_names = (
    st.text(_PLAIN_CHAR, min_size=1, max_size=255)
    .map(_at_most(255))
    .filter(lambda n: n and not n.startswith("."))
)


def escaped_length(name: str) -> int:
    """Bytes of the name with rule 1 applied, told by Unicode's categories (an oracle)."""
    return sum(
        len(c.encode()) * (3 if c in "%/" or unicodedata.category(c) == "Cc" else 1) for c in name
    ) + (2 if name.startswith(".") else 0)


def assert_one_path_component(file: str) -> None:
    raw = file.encode()
    assert 1 <= len(raw) <= NAME_MAX
    assert "/" not in file and "\0" not in file
    assert not any(unicodedata.category(c) == "Cc" for c in file)
    assert not file.startswith(".")  # no '.', '..', hidden file or receiver's own file
    assert os.path.basename(file) == file and Path(file).name == file
    assert os.path.normpath(os.path.join("/out", file)) == f"/out/{file}"


@given(block_names)
def test_round_trip_and_one_component(name: str) -> None:
    file = file_name_for(name)
    assert_one_path_component(file)
    back = block_name_from_file(file)
    if back is None:  # a digest name: only where the escaped form cannot fit
        prefix, digest = file.split("%+")
        assert digest == hashlib.sha256(name.encode()).hexdigest()
        assert name.startswith(urllib.parse.unquote(prefix, errors="strict"))
    assert (back is None) == (escaped_length(name) > NAME_MAX)
    if back is not None:
        assert back == name
        assert urllib.parse.unquote(file, errors="strict") == name


@given(block_names)
def test_a_name_equal_to_another_names_file_gets_another_file(name: str) -> None:
    file = file_name_for(name)
    if file != name:  # ``file`` is itself a valid block name: it must not land on ``file``
        assert file_name_for(file) != file


@given(st.lists(block_names, max_size=20))
def test_distinct_names_give_distinct_files(names: list[str]) -> None:
    """Any set of names, with each one's file name as a name too: as many files as names."""
    every = set(names) | {file_name_for(n) for n in names}
    assert len({file_name_for(n) for n in every}) == len(every)


@given(block_names, st.sampled_from("%/\n.\x85"), st.sampled_from("%/\n.\x85"))
def test_names_differing_only_in_escaped_characters(base: str, x: str, y: str) -> None:
    """The same name with one escaped character in place of another, at the start, the
    middle or the end: different names, different files."""
    base = _at_most(200)(base)
    for at in (0, len(base) // 2, len(base)):
        a, b = base[:at] + x + base[at:], base[:at] + y + base[at:]
        assert (file_name_for(a) == file_name_for(b)) == (x == y)


def test_long_names_differing_past_the_prefix() -> None:
    a, b = "/" * 254 + "a", "/" * 254 + "b"
    assert file_name_for(a).split("%+")[0] == file_name_for(b).split("%+")[0]
    assert file_name_for(a) != file_name_for(b)


@given(plain_names)
def test_plain_names_are_unchanged(name: str) -> None:
    assert file_name_for(name) == name


# --- the receiver's directory -------------------------------------------------------------


def fill(block: RAMBlock, seed: int) -> bytes:
    data = bytes((seed + i) % 251 for i in range(block.size))
    block.host[:] = data
    return data


@pytest.mark.parametrize("order", [("a", "a.part"), ("a.part", "a")])
def test_a_temporary_name_is_never_another_blocks_file(
    tmp_path: Path, order: tuple[str, str]
) -> None:
    """Blocks ``a`` and ``a.part``: ``a``'s temporary file is not ``a.part``, in either order
    (before, one of the two files was lost)."""
    out = ReceivedFiles(tmp_path)
    data = {}
    for i, name in enumerate(order):
        block = out.block_factory(name, 2 * PS, PS)
        data[name] = fill(block, i)
        temporary = {got.part for got in out.received.values()}
        assert not temporary & {got.file for got in out.received.values()}
        assert temporary == {p.name for p in tmp_path.iterdir()}
    out.commit(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "a", "a.part"]
    for name, expected in data.items():
        assert (tmp_path / name).read_bytes() == expected


def test_a_255_byte_name_has_a_short_temporary_name(tmp_path: Path) -> None:
    out = ReceivedFiles(tmp_path)
    data = fill(out.block_factory(LONG_PLAIN, PS, PS), 3)
    [temporary] = [p.name for p in tmp_path.iterdir()]
    assert re.fullmatch(r"\.multifd-[0-9a-f]{16}\.part", temporary)  # the receiver's own name
    out.commit(json.dumps({"multifd-files": {LONG_PLAIN: 10}}).encode())
    assert (tmp_path / LONG_PLAIN).read_bytes() == data[:10]


def test_two_blocks_for_one_file_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cannot happen with SHA-256 (rule 3); if it did, the second block is refused, nothing
    is overwritten."""
    out = ReceivedFiles(tmp_path)
    out.block_factory("one", PS, PS)
    monkeypatch.setattr(files_module, "file_name_for", lambda name: "one")
    with pytest.raises(ProtocolError, match="would be one file"):
        out.block_factory("two", PS, PS)
    out.discard()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "description",
    [
        b"not json",
        b"[1]",
        b'{"multifd-files": {"x": "big"}}',
        b'{"multifd-files": {"x": 0}}',
        b'{"multifd-files": {"x": 4097}}',
        b"[" * 100000,
    ],
)
def test_a_bad_description_leaves_nothing(tmp_path: Path, description: bytes) -> None:
    out = ReceivedFiles(tmp_path)
    out.block_factory("x", PS, PS)
    with pytest.raises(ProtocolError):
        out.commit(description)
    out.discard()
    assert not list(tmp_path.iterdir())


# --- end to end -----------------------------------------------------------------------------

#: QEMU's own block names, and awkward ones, with their sizes in bytes
SOURCE_BLOCKS = {
    "pc.ram": 64 * PS,
    "/rom@etc/acpi/tables": 32 * PS,
    "0000:00:02.0/vga.vram": 16 * PS,
    "/rom@etc/table-loader": PS,
    "/rom@etc/acpi/rsdp": PS,
    LONG_PLAIN: 2 * PS,
    LONG_SLASHES: PS,
    "/" * 254 + "x": PS,  # the same digest-name prefix as the one above
    "my disk.img": 3 * PS,
    "50%.img": PS,
    "a/b": PS,
    "a%2Fb": PS,  # a/b's file name as a block name
    "new\nline": PS,
    "été/日本語.img": PS,
    ".multifd-recv.json": PS,  # the manifest's name as a block name
    "a": 2 * PS,
    "a.part": 2 * PS,  # a's temporary name, as a block name
}
#: the exact file sizes a ``multifd send``-like source gives in its description
EXACT = {"pc.ram": 64 * PS - 100, "my disk.img": 2 * PS + 1, LONG_PLAIN: 5, "a": 1}


async def migrate_named_blocks(port: int) -> dict[str, bytes]:
    """A library source with freely named blocks; returns each block's expected file content."""
    blocks = []
    expected = {}
    for seed, (name, size) in enumerate(SOURCE_BLOCKS.items()):
        block = RAMBlock.allocate(name, size, PS)
        data = fill(block, seed)
        expected[name] = data[: EXACT.get(name, size)]
        blocks.append(block)
    description = {"multifd-files": EXACT, "origin": "test_block_names"}
    async with open_source(
        blocks,
        tcp_connector("127.0.0.1", port),
        channels=3,
        description=json.dumps(description).encode(),
    ) as src:
        with trio.fail_after(30):
            await src.complete()
    return expected


async def test_qemu_block_names_into_recv(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "3", "--json") as (recv, port):
        expected = await migrate_named_blocks(port)
        received = finish(recv)
    assert received.rc == 0, received.err
    out = json.loads(received.out)
    assert out["status"] == "completed"
    files = {name: file_name_for(name) for name in SOURCE_BLOCKS}
    assert files["/rom@etc/acpi/tables"] == "%2From@etc%2Facpi%2Ftables"
    assert files["0000:00:02.0/vga.vram"] == "0000:00:02.0%2Fvga.vram"
    assert files["pc.ram"] == "pc.ram" and files[LONG_PLAIN] == LONG_PLAIN
    assert out["files"] == {name: str(out_dir / file) for name, file in files.items()}
    assert out["manifest"] == str(out_dir / MANIFEST)
    # nothing else in DIR, nothing outside it, no temporary file left
    assert sorted(os.listdir(out_dir)) == sorted([*files.values(), MANIFEST])
    assert sorted(os.listdir(tmp_path)) == ["out", "ready"]
    for name, data in expected.items():
        assert (out_dir / files[name]).read_bytes() == data, name

    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert manifest["format"] == "multifd-recv/1"
    assert manifest["blocks"] == [
        {"name": name, "file": files[name], "size": len(expected[name]), "block-size": size}
        for name, size in SOURCE_BLOCKS.items()
    ]
    assert manifest["description"] == {"multifd-files": EXACT, "origin": "test_block_names"}
    # a later tool maps every file back to its block: by the rule, or by the manifest
    by_file = {b["file"]: b["name"] for b in manifest["blocks"]}
    for file, name in by_file.items():
        assert block_name_from_file(file) in (name, None)
    assert [f for f in by_file if block_name_from_file(f) is None] == [
        files[LONG_SLASHES],
        files["/" * 254 + "x"],
    ]


AWKWARD_FILES = {
    "disk.img": 5 * PS + 7,
    "my disk.img": PS,
    "50%.img": 100,
    "new\nline.img": PS,
    ".hidden": 10,
    "été.img": 2 * PS,
    "a": 3,
    "a.part": PS + 1,
    LONG_PLAIN: 33,
}


def test_send_recv_awkward_file_names(tmp_path: Path) -> None:
    """``multifd send`` of files with such names: plain ones keep theirs, the others are
    escaped, and the manifest says which is which."""
    sources = random_files(tmp_path / "in", AWKWARD_FILES, 12)
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir, "--channels", "2", "--json") as (recv, port):
        sent = run("send", "--connect", f"127.0.0.1:{port}", "--channels", "2", *map(str, sources))
        received = finish(recv)
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    renamed = {"50%.img": "50%25.img", "new\nline.img": "new%0Aline.img", ".hidden": "%2Ehidden"}
    files = {name: renamed.get(name, name) for name in AWKWARD_FILES}
    assert sorted(os.listdir(out_dir)) == sorted([*files.values(), MANIFEST])
    for src in sources:
        assert (out_dir / files[src.name]).read_bytes() == src.read_bytes(), src.name
    manifest: dict[str, Any] = json.loads((out_dir / MANIFEST).read_text())
    assert {b["name"]: (b["file"], b["size"]) for b in manifest["blocks"]} == {
        name: (files[name], size) for name, size in AWKWARD_FILES.items()
    }
    assert manifest["description"] == {"multifd-files": AWKWARD_FILES}


def test_recv_human_output_names_the_manifest(tmp_path: Path) -> None:
    sources = random_files(tmp_path / "in", {"x.img": PS}, 1)
    out_dir = tmp_path / "out"
    with receiver(tmp_path / "ready", out_dir) as (recv, port):
        sent = run("send", "--connect", f"127.0.0.1:{port}", *map(str, sources))
        received = finish(recv)
    assert sent.rc == 0, sent.err
    assert received.rc == 0, received.err
    assert f"  {'manifest':<17} {out_dir / MANIFEST}\n" in received.out + "\n"
