"""The one thread a replica runs model compute on, and the health check that watches it.

Engine calls leave the event loop, so batching, health checks and metrics keep running while a batch
computes, and a single long-lived thread runs one batch at a time. Ray sets OMP_NUM_THREADS from the
actor's `num_cpus`; the thread sets torch's thread count itself (the tier's `torch_threads`) so the
replica computes with the threads its config asks for.

The engine is also loaded and warmed up on this thread (`call`), so no other thread of the replica ever
starts an OpenMP team. libgomp (torch's OpenMP on Linux) keeps one team per thread that starts parallel
work, and once its teams hold more threads than the process has CPUs it cuts the spin before a waiting
thread sleeps to almost nothing: every parallel region then ends in futex sleeps and wakeups. With the
engine loaded on the actor's main thread and run here, a 2-core replica's torch threads slept ~1,000
times a second each and its engine ran ~9 % slower than the same engine in one thread
(benchmarks/bench_compute_thread.py).

A replica whose engine hangs (a stuck kernel, a deadlock in a native library) still answers on its
event loop, so Serve would keep routing to it. `ComputeThread.check` fails once one engine call has
run longer than `wedged_after_s`; the tier's `check_health` calls it, and Serve replaces the replica
(the router then retries the requests it held on another one).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor


class EngineWedged(RuntimeError):
    """An engine call has run longer than the tier's wedged_after_s."""


class ComputeThread:
    def __init__(self, torch_threads: int | None, wedged_after_s: float):
        import torch

        threads = torch_threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-compute",
                                        initializer=torch.set_num_threads, initargs=(threads,))
        self.wedged_after_s = wedged_after_s
        self._busy_since: float | None = None  # start of the engine call running now

    def call(self, fn, *args):
        """`fn(*args)` on the compute thread, waiting for it here: for work before the event loop serves,
        such as loading the engine (see the module's docstring for why it must not run elsewhere)."""
        return self._pool.submit(self._timed, fn, args).result()

    async def run(self, fn, *args):
        """`fn(*args)` on the compute thread; the event loop stays free while it runs."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn, args)

    def _timed(self, fn, args):
        self._busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._busy_since = None

    def check(self) -> None:
        """Raise EngineWedged when the engine call in progress has run past `wedged_after_s`."""
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.wedged_after_s:
            raise EngineWedged(f"an engine call has run for {time.monotonic() - since:.0f} s, past wedged_after_s="
                               f"{self.wedged_after_s:g}")
