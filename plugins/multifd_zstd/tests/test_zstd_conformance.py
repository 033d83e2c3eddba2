"""multifd_core's plugin conformance kit, run against the zstd method."""

from __future__ import annotations

from multifd_zstd import ZstdMethod

from multifd_core.testing import MethodConformance


class TestZstdConformance(MethodConformance):
    def make_method(self) -> ZstdMethod:
        return ZstdMethod()


class TestZstdConformanceOtherLevel(MethodConformance):
    def make_method(self) -> ZstdMethod:
        return ZstdMethod(**{"level": "3"})
