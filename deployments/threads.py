"""The one thread a replica runs model compute on.

Engine calls leave the event loop, so batching, health checks and metrics keep running while a batch
computes, and a single long-lived thread runs one batch at a time. Ray sets OMP_NUM_THREADS from the
actor's `num_cpus`; the thread sets torch's thread count itself (the tier's `torch_threads`) so the
replica computes with the threads its config asks for.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def compute_thread(torch_threads: int | None) -> ThreadPoolExecutor:
    import torch

    threads = torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-compute",
                              initializer=torch.set_num_threads, initargs=(threads,))
