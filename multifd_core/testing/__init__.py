"""Test support for multifd and its plugins: page generators, a loopback harness, and the
conformance kit.

- :mod:`~multifd_core.testing.pages`: every page and data generator the tests use.
- :mod:`~multifd_core.testing.harness`: :func:`run_loopback`, a source and a destination in one
  trio run over memory streams, loopback TCP or any given link, returning both ends' stats and
  blocks or their typed errors; :func:`destination_against` for hand-written hostile peers.
- :mod:`~multifd_core.testing.conformance`: :class:`MethodConformance`, what every compression
  method must do, and :func:`migrate_pair` / :func:`migrate_by_name`.
- :mod:`~multifd_core.testing.compare`: the kit's verdicts, :func:`check` and
  :func:`check_same` (``AssertionError`` naming block, page and offset of the first difference).
- :mod:`~multifd_core.testing.gil`: :func:`check_releases_gil`, whether a threaded method's
  calls release the GIL.
- :mod:`~multifd_core.testing.plugin_checks`: :class:`PluginChecks` / :class:`StreamChecks`, the
  checks every installed plugin shares.
"""

from __future__ import annotations

from .. import Acceptor
from .compare import check, check_same, difference, first_difference
from .conformance import (
    FULL_PACKET,
    MethodConformance,
    check_bound,
    check_decoded,
    conformance_classes,
    identity_method,
    migrate_by_name,
    migrate_pair,
)
from .gil import check_releases_gil, heartbeat_share
from .harness import (
    TIMEOUT,
    DestinationRun,
    Link,
    LoopbackRun,
    destination_against,
    open_link,
    run_destination,
    run_loopback,
)
from .pages import (
    KINDS,
    PAGE,
    TEXT,
    Guarded,
    dirty_blocks,
    guarded_block,
    image_blocks,
    join,
    mixed_pages,
    page_views,
    prepare,
    prepare_payload,
    random_files,
    random_runs,
    receive_payload,
    sample_pages,
    tagged_page,
)
from .plugin_checks import (
    PluginChecks,
    StreamChecks,
    context_pair,
    expect_refused,
    interleave_two_channels,
    round_trips,
)

__all__ = [
    "FULL_PACKET",
    "KINDS",
    "PAGE",
    "TEXT",
    "TIMEOUT",
    "Acceptor",
    "DestinationRun",
    "Guarded",
    "Link",
    "LoopbackRun",
    "MethodConformance",
    "PluginChecks",
    "StreamChecks",
    "check",
    "check_bound",
    "check_decoded",
    "check_releases_gil",
    "check_same",
    "conformance_classes",
    "context_pair",
    "destination_against",
    "difference",
    "dirty_blocks",
    "expect_refused",
    "first_difference",
    "guarded_block",
    "heartbeat_share",
    "identity_method",
    "image_blocks",
    "interleave_two_channels",
    "join",
    "migrate_by_name",
    "migrate_pair",
    "mixed_pages",
    "open_link",
    "page_views",
    "prepare",
    "prepare_payload",
    "random_files",
    "random_runs",
    "receive_payload",
    "round_trips",
    "run_destination",
    "run_loopback",
    "sample_pages",
    "tagged_page",
]
