"""Test support for multifd and its plugins: page generators, a loopback harness, and the
conformance kit.

- :mod:`~multifd_core.testing.pages`: every page and data generator the tests use.
- :mod:`~multifd_core.testing.harness`: :func:`run_loopback`, a source and a destination in one
  trio run over memory streams, loopback TCP or any given link, returning both ends' stats and
  blocks or their typed errors; :func:`destination_against` for hand-written hostile peers.
- :mod:`~multifd_core.testing.conformance`: :class:`MethodConformance`, what every compression
  method must do, and :func:`migrate_pair` / :func:`migrate_by_name`.
- :mod:`~multifd_core.testing.plugin_checks`: :class:`PluginChecks` / :class:`StreamChecks`, the
  checks every installed plugin shares.
"""

from __future__ import annotations

from .. import Accept
from .conformance import (
    MethodConformance,
    conformance_classes,
    identity_method,
    migrate_by_name,
    migrate_pair,
)
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
    "KINDS",
    "PAGE",
    "TEXT",
    "TIMEOUT",
    "Accept",
    "DestinationRun",
    "Guarded",
    "Link",
    "LoopbackRun",
    "MethodConformance",
    "PluginChecks",
    "StreamChecks",
    "conformance_classes",
    "context_pair",
    "destination_against",
    "dirty_blocks",
    "expect_refused",
    "guarded_block",
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
