"""tune_malloc: packet-sized buffers stop faulting their pages in again for every packet."""

from __future__ import annotations

import os
import subprocess
import sys

from multifd_core.malloc import tune_malloc

# A 64 MiB VM-like lz4 migration, both ends in one process: the minor page faults it costs. In
# QEMU's 512 KiB packets (what qemu-save and qemu-restore move): 128 packets, so that refaulting
# each packet's buffers, not their first touch, is what is counted (with 2 MiB packets, 32 of
# them, the margin was seen down to 8,865 plain / 6,401 tuned, within noise of the bound).
MIGRATION = """
import resource, sys, trio
from multifd_core.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
from multifd_core import MemoryNetwork, RAMBlock, open_destination, open_source
from multifd_core.image import vm_like_image

async def main():
    block = RAMBlock("ram", vm_like_image(64 << 20, 4096, 1))
    target = RAMBlock("ram", bytearray(64 << 20))
    target.memory[:] = block.memory  # every destination page touched before
    net = MemoryNetwork()
    async with trio.open_nursery() as n:
        async def dst():
            async with open_destination(net.accept, channels=2, method="lz4", blocks=[target]) as d:
                await d.wait()
        n.start_soon(dst)
        async with open_source(
            [block], net.connect, channels=2, method="lz4", packet_size=512 << 10
        ) as s:
            t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            await s.complete()
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - t0)
trio.run(main)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MIGRATION, mode], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_tuned_allocator_stops_refaulting_packet_buffers() -> None:
    plain, tuned = faults("plain"), faults("tuned")
    # measured (512 KiB packets): 5,150-7,200 faults plain, 2,240-2,320 tuned; earlier engines
    # ~18,000-21,000 plain
    assert tuned < 0.7 * plain, (plain, tuned)


def test_a_user_allocator_setting_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert tune_malloc() is False


# tune_process, in a fresh interpreter each (it changes the process: env, gc, allocator)
TUNE = """
import gc, os, sys
from multifd_core.malloc import GC_THRESHOLD, tune_process
tune_process()
import numpy  # after: its OpenBLAS reads the variable at load
print(os.environ.get("OPENBLAS_NUM_THREADS"), gc.get_threshold()[0] == GC_THRESHOLD,
      gc.get_freeze_count() > 1000, len(os.listdir("/proc/self/task")))
"""


def run_tune(env: dict[str, str]) -> list[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", TUNE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_tune_process_keeps_openblas_to_one_thread_and_the_collector_out_of_the_way() -> None:
    blas, threshold, frozen, threads = run_tune({})
    assert (blas, threshold, frozen) == ("1", "True", "True")
    assert int(threads) == 1  # the OS threads: no OpenBLAS thread beside the main one
    # a user's own setting stands: OpenBLAS then starts its one more thread
    blas, _, _, threads = run_tune({"OPENBLAS_NUM_THREADS": "2"})
    assert blas == "2" and int(threads) == 2
