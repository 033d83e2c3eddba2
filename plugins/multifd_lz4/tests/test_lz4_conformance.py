"""multifd_core's plugin conformance kit, run against the lz4 method."""

from __future__ import annotations

from multifd_lz4 import Lz4Method

from multifd_core.testing import MethodConformance


class TestLz4Conformance(MethodConformance):
    def make_method(self) -> Lz4Method:
        return Lz4Method()


class TestLz4ConformanceOtherLevel(MethodConformance):
    def make_method(self) -> Lz4Method:
        return Lz4Method(**{"acceleration": "8"})
