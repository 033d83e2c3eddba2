"""Shared fixtures."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import AsyncIterator

import pytest
import trio

# test helper modules (fault_streams, qemu_harness, ...) import by name from here
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
async def no_leaks() -> AsyncIterator[None]:
    """Fail the test if it leaves file descriptors (sockets) or trio tasks behind."""
    before = open_fds()
    tasks_before = set(trio_tasks())
    yield
    gc.collect()
    leaked = open_fds() - before
    details = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in leaked
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not details, f"leaked file descriptors: {details}"
    # every task started during the test must have ended with it
    left = [t.name for t in trio_tasks() if t not in tasks_before]
    assert not left, f"trio tasks left running: {left}"


def trio_tasks() -> list[trio.lowlevel.Task]:
    """Every task alive in the current trio run."""
    stack = [trio.lowlevel.current_root_task()]
    tasks = []
    while stack:
        task = stack.pop()
        tasks.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return tasks


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Fake plugin distributions for one test; load_methods discovers anew while they are
    there, and again once they are gone (its registries are cached per process)."""
    from fakesite import FakeSite

    from multifd_core.registry import clear_method_cache

    fake = FakeSite(tmp_path, monkeypatch)
    clear_method_cache()
    yield fake
    clear_method_cache()
    for name in fake.modules:
        sys.modules.pop(name, None)
