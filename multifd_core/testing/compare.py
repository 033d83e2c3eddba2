"""The kit's verdicts: explicit ``AssertionError`` messages that say where pages differ.

The kit runs from an installed package, where pytest does not rewrite ``assert`` (and ``python
-O`` drops it), so every check here raises ``AssertionError`` with its own message: which block,
which page and which byte first differs, and how many pages differ in all. Comparing is done in
C (``bytes ==``, numpy for the details of a mismatch).
"""

from __future__ import annotations

import numpy as np

from ..methods import Buffer
from .pages import PAGE


def check(ok: object, message: str) -> None:
    """Raise ``AssertionError(message)`` unless ``ok``: an ``assert`` that survives install."""
    if not ok:
        raise AssertionError(message)


def first_difference(expected: Buffer, actual: Buffer) -> int | None:
    """The offset of the first byte where ``actual`` differs from ``expected`` (the shorter one's
    length when one is a prefix of the other); None when they are equal."""
    if len(expected) == len(actual) and memoryview(expected) == memoryview(actual):
        return None
    n = min(len(expected), len(actual))
    a = np.frombuffer(expected, np.uint8, count=n)
    b = np.frombuffer(actual, np.uint8, count=n)
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


def difference(
    expected: Buffer, actual: Buffer, *, block: str | None = None, page_size: int = PAGE
) -> str | None:
    """Where ``actual`` first differs from ``expected``, pages of ``page_size`` bytes of
    ``block`` (when named): None when they are equal."""
    at = first_difference(expected, actual)
    if at is None:
        return None
    where = f"block {block!r}, " if block is not None else ""
    if at == min(len(expected), len(actual)):
        return f"{where}{len(actual)} bytes where {len(expected)} were expected (equal up to there)"
    page, within = divmod(at, page_size)
    a, b = memoryview(expected)[at], memoryview(actual)[at]
    text = (
        f"{where}page {page}, offset {at} (byte {within} of the page) differs first: "
        f"expected {a:#04x}, got {b:#04x}"
    )
    if len(expected) == len(actual) and len(expected) % page_size == 0:
        pages = len(expected) // page_size
        x = np.frombuffer(expected, np.uint8).reshape(pages, page_size)
        y = np.frombuffer(actual, np.uint8).reshape(pages, page_size)
        text += f"; {int((x != y).any(axis=1).sum())} of {pages} pages differ"
    return text


def check_same(
    expected: Buffer,
    actual: Buffer,
    what: str,
    *,
    block: str | None = None,
    page_size: int = PAGE,
) -> None:
    """Raise ``AssertionError("<what>: <where they differ>")`` unless the bytes are equal."""
    diff = difference(expected, actual, block=block, page_size=page_size)
    if diff is not None:
        raise AssertionError(f"{what}: {diff}")


__all__ = ["check", "check_same", "difference", "first_difference"]
