"""The plugin conformance kit run against the built-in nocomp method."""

from __future__ import annotations

from multifd_core.nocomp import Nocomp
from multifd_core.testing import MethodConformance


class TestNocompConformance(MethodConformance):
    def make_method(self) -> Nocomp:
        return Nocomp()
