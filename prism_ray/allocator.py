"""Keep glibc from handing the engines' activation memory back to the kernel after every forward.

A CPU forward allocates and frees the same tens of megabytes again and again (batched activations, the
Gated DeltaNet chunk buffers). glibc serves blocks above its mmap threshold (128 KiB, raised only as far as
the largest block freed so far) with fresh mmaps, and gives the top of its heap back above its trim
threshold; each reuse then page-faults the memory in again. On this project's 2-core CPU, scoring 20
documents with the 0.8B model in bf16 took ~2.2 million page faults and 3.5-4.9 s of system time in a
~12 s call; with the two thresholds raised, no faults and ~9.5 s (`benchmarks/bench_engines.py` runs
with it, as every engine process does). Path A, which allocates smaller, repeating shapes, was unchanged.

The cost: memory freed inside the process stays with it (up to `TRIM_THRESHOLD` above what is in use)
rather than going back to the system, so RSS stays near its high-water mark. That is what a long-running
replica wants anyway. Set PRISM_RAY_MALLOC_TUNING=0 to leave the allocator alone.

A router wants the opposite (`return_large_blocks`): its large blocks are request bodies (up to
max_body_bytes each, and their decoded text), which come and go with requests of any size. glibc's
dynamic threshold rises to the largest block freed, so after one 16 MiB body every later one is served
from the heap and its memory stays with the process; a fixed 1 MiB threshold maps each large body on its
own and unmaps it when it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger("prism_ray")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def _mallopt():
    if os.environ.get("PRISM_RAY_MALLOC_TUNING", "1") == "0":
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return None


@functools.cache
def return_large_blocks(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at `threshold` (a router process: see the module's docstring)."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where that is not glibc or it is off."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.info("malloc thresholds raised (mmap %d MiB, trim %d MiB): %s", MMAP_THRESHOLD >> 20,
             TRIM_THRESHOLD >> 20, ok)
    return ok
