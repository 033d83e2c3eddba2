"""multifd_core's plugin conformance kit, run against the zlib method."""

from __future__ import annotations

from multifd_zlib import ZlibMethod

from multifd_core.testing import MethodConformance


class TestZlibConformance(MethodConformance):
    def make_method(self) -> ZlibMethod:
        return ZlibMethod()


class TestZlibConformanceOtherLevel(MethodConformance):
    def make_method(self) -> ZlibMethod:
        return ZlibMethod(**{"level": "3"})
