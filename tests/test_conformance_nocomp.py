"""The plugin conformance kit run against the built-in nocomp method."""

from __future__ import annotations

from multifd_core.nocomp import Nocomp
from multifd_core.testing import MethodConformance


class TestNocompConformance(MethodConformance):
    def make_method(self) -> Nocomp:
        return Nocomp()

    # nocomp runs no codec in worker threads (its payload is its pages): no GIL to release
    test_threaded_calls_release_the_gil = None
