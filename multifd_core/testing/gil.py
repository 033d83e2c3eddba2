"""Whether a method's calls really release the GIL, as ``threaded = True`` promises.

The engine runs a threaded method's ``send_prepare``/``recv_pages`` in worker threads while the
trio thread keeps moving bytes. That only works when the method's C code releases the GIL while
it works: one that holds it (a binding that does not release it, or Python code) stalls every
channel and the program for each call, and gets no parallelism.

The criterion, robust to a loaded machine because it counts turns rather than seconds: while a
worker thread runs the method's calls back to back (one packet of 128 VM-like pages per call,
fresh contexts each time, for about :data:`RUN` seconds), the main thread keeps a *heartbeat*:
it sleeps :data:`BEAT` seconds, then runs a little bytecode, which needs the GIL. The switch
interval is :data:`SWITCH_INTERVAL` meanwhile, so a thread that holds the GIL keeps it that long
before the interpreter makes it hand over. The *share* is the heartbeats counted while the
method ran, over those the same heartbeat counts alone in as much time (measured just before).

- A method that releases the GIL leaves the heartbeat at full speed: a share near 1 (0.6 to 1.3
  seen for zlib, zstd, lz4 and bz2 on a machine whose other core was busy; 0.2 to 0.9 with
  three busy loops on its two cores, where a method that holds the GIL for part of each call,
  as lz4's receiver does while it copies the pages, loses more).
- One that holds it lets the heartbeat beat only when the interpreter forces a switch: once per
  switch interval, a share of about ``BEAT / SWITCH_INTERVAL`` (0.005 to 0.015 seen, C code that
  keeps the GIL or Python code alike).

A method passes with a share of at least :data:`MIN_SHARE`, on each side; one below it is measured
again, up to :data:`TRIES` times in all (a loaded machine can slow a heartbeat, it cannot speed
one up past the GIL).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from ..methods import MultiFDMethod
from .pages import PAGE, join, mixed_pages

#: The main thread's heartbeat: it sleeps this long, then takes the GIL for a few bytecodes.
BEAT = 0.0005
#: The switch interval while measuring: how long a thread holding the GIL keeps it.
SWITCH_INTERVAL = 0.1
#: About how long the method's calls run, back to back, for one measurement (seconds).
RUN = 0.15
#: The least share of heartbeats a method that releases the GIL leaves the main thread.
MIN_SHARE = 0.1
#: Measurements before a method is said to hold the GIL.
TRIES = 3


def _heartbeats(stop: list[bool]) -> int:
    beats = 0
    while not stop[0]:
        time.sleep(BEAT)
        beats += 1
    return beats


def heartbeat_share(work: Callable[[], object], seconds: float = RUN) -> float:
    """The main thread's heartbeats while ``work`` runs over and over in a worker thread (at
    least twice, about ``seconds`` in all), over its heartbeats alone in the same time."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        stop = [False]
        timer = threading.Timer(seconds / 3, stop.__setitem__, (0, True))
        start = time.perf_counter()
        timer.start()
        alone = _heartbeats(stop) / (time.perf_counter() - start)
        timer.join()

        stop[0] = False
        errors: list[BaseException] = []

        def run() -> None:
            try:
                end, calls = time.perf_counter() + seconds, 0
                while calls < 2 or time.perf_counter() < end:
                    work()
                    calls += 1
            except BaseException as exc:  # handed to the main thread below
                errors.append(exc)
            finally:
                stop[0] = True

        worker = threading.Thread(target=run, name="gil-check")
        start = time.perf_counter()
        worker.start()
        beats = _heartbeats(stop)
        elapsed = time.perf_counter() - start
        worker.join()
    finally:
        sys.setswitchinterval(old)
    if errors:
        raise errors[0]
    return beats / (alone * elapsed)


def _sides(method: MultiFDMethod, npages: int) -> dict[str, Callable[[], None]]:
    """One call of each side on a packet of ``npages`` pages, each with fresh contexts."""
    pages = [memoryview(p) for p in mixed_pages(npages, 17)]
    tx = method.send_setup(0)
    payload = join(tx.send_prepare(pages))
    tx.send_cleanup()
    out = bytearray(npages * PAGE)
    views = [memoryview(out)[i * PAGE : (i + 1) * PAGE] for i in range(npages)]

    def send() -> None:
        ctx = method.send_setup(0)
        try:
            ctx.send_prepare(pages)
        finally:
            ctx.send_cleanup()

    def recv() -> None:
        ctx = method.recv_setup(0)
        try:
            ctx.recv_pages(memoryview(payload), views)
        finally:
            ctx.recv_cleanup()

    return {"send_prepare": send, "recv_pages": recv}


def check_releases_gil(method: MultiFDMethod, npages: int = 128) -> dict[str, float]:
    """Raise ``AssertionError`` unless ``send_prepare`` and ``recv_pages`` each leave the main
    thread at least :data:`MIN_SHARE` of its heartbeats (see the module's doc); return the
    shares measured."""
    shares: dict[str, float] = {}
    for side, work in _sides(method, npages).items():
        best = 0.0
        for _ in range(TRIES):
            best = max(best, heartbeat_share(work))
            if best >= MIN_SHARE:
                break
        shares[side] = best
        if best < MIN_SHARE:
            raise AssertionError(
                f"{method.name} is threaded but its {side} holds the GIL: while it ran in a "
                f"worker thread the main thread kept {best:.0%} of its heartbeats, at best of "
                f"{TRIES} tries (at least {MIN_SHARE:.0%} expected: a call that releases the GIL "
                "leaves about 100%, see multifd_core.testing.gil). Release the GIL in its C code, "
                "or set threaded = False"
            )
    return shares


__all__ = ["BEAT", "MIN_SHARE", "RUN", "SWITCH_INTERVAL", "TRIES", "check_releases_gil"]
