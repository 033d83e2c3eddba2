"""Fake installed plugin distributions for the registry's tests: dist-info directories and
plugin modules in a directory on ``sys.path``, found by ``importlib.metadata`` as if installed.
The ``site`` fixture (conftest.py) gives one per test."""

from __future__ import annotations

import importlib
import textwrap
import uuid
from pathlib import Path

import pytest
from procs import write_dist_info

METHOD_SRC = """
from multifd_core import hookimpl, MultiFDMethod, SendContext, RecvContext


class {cls}(MultiFDMethod):
    name = {name!r}
    value = {value!r}

    def send_setup(self, channel):
        return SendContext()

    def recv_setup(self, channel):
        return RecvContext()


@hookimpl
def multifd_methods():
    return [{cls}]
"""


class FakeSite:
    """Fake installed distributions (dist-info + modules) in a directory on sys.path."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.modules: list[str] = []
        self.tag = uuid.uuid4().hex[:8]
        monkeypatch.syspath_prepend(str(root))

    def module(self, stem: str, source: str) -> str:
        """Write a plugin module; returns its (test-unique) import name."""
        name = f"mfd_{stem}_{self.tag}"
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        self.modules.append(name)
        return name

    def method_module(self, stem: str, name: str, value: object) -> str:
        return self.module(stem, METHOD_SRC.format(cls=f"M_{stem}", name=name, value=value))

    def dist(self, dist_name: str, entry_points: dict[str, str]) -> None:
        write_dist_info(self.root, dist_name, entry_points)
        importlib.invalidate_caches()

    def method_dist(self, dist_name: str, name: str, value: object) -> str:
        mod = self.method_module(dist_name, name, value)
        self.dist(dist_name, {f"ep_{dist_name}": mod})
        return mod
