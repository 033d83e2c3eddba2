"""Shared fixtures."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
import trio


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves file descriptors (sockets) or trio tasks behind."""
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    details = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in leaked
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not details, f"leaked file descriptors: {details}"


def trio_task_count() -> int:
    """Tasks alive in the current trio run (for leak checks inside a test)."""
    root = trio.lowlevel.current_root_task()
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count
