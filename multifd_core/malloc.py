"""Process settings for a process that migrates: ``tune_malloc``, ``tune_process``.

Compression methods hand back a fresh buffer of about a packet (0.5 MiB) for every packet, and
worker threads allocate them. With glibc's defaults such buffers are often fresh mappings or
land at the top of a heap that is trimmed as soon as they are freed, so every packet faults its
pages in again: a 1 GiB VM-like lz4 migration took 141,000 minor faults and 0.63 s of system
time on the source, 26,000 and 0.27 s with the settings below (measured; the migration ~20 %
faster). The ``multifd`` command applies them; a program embedding the library may call
``tune_malloc`` itself (it changes the whole process's allocator, so the library never does).
"""

from __future__ import annotations

import ctypes
import gc
import os

#: mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Buffers up to this size come from the heaps (glibc's default starts at 128 KiB).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of a heap kept for reuse rather than returned to the system.
TRIM_THRESHOLD = 64 << 20

#: Environment variables that set the same things; a user who sets one keeps control.
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Serve packet-sized buffers from the heaps and keep freed heap memory for the next packet.
    True if applied; False where the C library has no ``mallopt`` (not glibc) or the user set
    the allocator through the environment."""
    if any(os.environ.get(name) for name in ENV_VARS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mmap threshold first: setting either disables glibc's dynamic adjustment of both
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


#: The cyclic garbage collector's first threshold while migrating (Python's default: 700). The
#: engine allocates a few short-lived objects per packet and makes no cycles worth collecting
#: mid-migration. (perf showed gc_collect_main at 5-9 % of a 1 GiB migration's processes, but
#: gc callbacks put the collections during the migration at ~16 ms: most of it is the
#: collection at interpreter exit, which this does not change.)
GC_THRESHOLD = 50_000


def tune_process() -> None:
    """``tune_malloc``, and two settings a ``multifd`` command applies before it migrates:

    - numpy's OpenBLAS starts one spinning thread per core at import, for linear algebra this
      engine never does (``blas_thread_server`` took ~3 % of the sender's CPU): one thread,
      unless the user set ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``) themselves. It must
      run before numpy is first imported.
    - the objects made so far (modules, classes, the plugins) move out of the collector's way
      (``gc.freeze``) and its first threshold is raised to GC_THRESHOLD.

    Both change the whole process, so the library never applies them itself; an embedding
    program may call this (before importing numpy) or choose its own."""
    if not any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    tune_malloc()
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)


__all__ = ["GC_THRESHOLD", "tune_malloc", "tune_process"]
