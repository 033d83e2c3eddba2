"""The destination fuzzer: seeds, mutations, a reference model, and one case run with its checks.

Shared by ``tests/test_fuzz.py`` (a few thousand cases in CI) and ``fuzz/run.py`` (the long run).

A *case* is a list of connections (the bytes each one delivers, main channel and multifd channels
in some accept order) made from a valid *seed* stream by zero or more mutations. The destination
(``open_destination``) receives them through replayed memory streams or real socketpairs, in chunks
of random sizes, each connection ending with EOF; it writes into blocks that are views into larger
buffers with canary bytes before and after. Every case must end, well within ``Config.bound``,
either completed with the right memory or with a ``MultiFDError``; the guards must be intact and
the traced memory peak below :func:`memory_bound`.

"The right memory" comes from :func:`model`, an independent reading of the same bytes.

Modules, by job: ``recordings`` (wire constants, the recording format), ``seeds`` (valid streams
of our source and of QEMU), ``reference`` (the model), ``mutations`` (the mutator), ``delivery``
(making cases and delivering their bytes), ``runner`` (one case run and its checks).
"""

from __future__ import annotations

from . import delivery, mutations, recordings, reference, runner, seeds
from .delivery import Case, ReplayStream, cases, chunk_sizes, feed_socket, make_case
from .mutations import PACKET_FIELDS, U8, U32, U64, Mutator, Packet, interesting, put, split_channel
from .recordings import DATA_DIR, HEADER, PS, QEVM, REC_MAGIC, load_recording, save_recording
from .reference import Verdict, method_named, model
from .runner import (
    GUARD,
    GUARD_BYTE,
    INITIAL_BYTE,
    Config,
    Result,
    check_seed,
    memory_bound,
    run_case,
)
from .seeds import (
    OUR_SEEDS,
    RecordingStream,
    Seed,
    all_seeds,
    deterministic,
    our_seeds,
    qemu_seeds,
    record_source,
    source_memory,
)

__all__ = [
    "Case",
    "Config",
    "DATA_DIR",
    "GUARD",
    "GUARD_BYTE",
    "HEADER",
    "INITIAL_BYTE",
    "Mutator",
    "OUR_SEEDS",
    "PACKET_FIELDS",
    "PS",
    "Packet",
    "QEVM",
    "REC_MAGIC",
    "RecordingStream",
    "ReplayStream",
    "Result",
    "Seed",
    "U32",
    "U64",
    "U8",
    "Verdict",
    "all_seeds",
    "cases",
    "check_seed",
    "chunk_sizes",
    "delivery",
    "deterministic",
    "feed_socket",
    "interesting",
    "load_recording",
    "make_case",
    "memory_bound",
    "method_named",
    "model",
    "mutations",
    "our_seeds",
    "put",
    "qemu_seeds",
    "record_source",
    "recordings",
    "reference",
    "run_case",
    "runner",
    "save_recording",
    "seeds",
    "source_memory",
    "split_channel",
]
