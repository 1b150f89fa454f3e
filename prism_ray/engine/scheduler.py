"""Scheduler: one decode loop for as long as a server lives; requests join it between decode steps.

    scheduler = Scheduler(engine, max_active_pairs=16, max_queued_pairs=64)
    handle = scheduler.submit(query, document, max_new_tokens=256)   # QueueFull when it is full
    async for text in handle.deltas():  # new text at each host sync (optional)
        ...
    result = await handle                # or handle.result(timeout); handle.cancel() frees its slot

One thread owns the engine's `DecodeLoop` (as text-embeddings-inference's queue task owns its batches): it
admits waiting pairs into free slots (their prefill packed together), decodes every active slot for a
window of `sync_every` steps, and retires pairs at their stop token, their own `max_new_tokens` or their
cancellation. Pairs with different limits and temperatures share every step. What it holds is bounded:
`max_active_pairs` slots decode at once and `max_queued_pairs` more may wait; one more is refused at once
(`QueueFull`), so a server can answer "saturated, retry later" instead of queueing without end.

Ray-free: the Serve evidence tier and the batch jobs' evidence actors wrap it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from prism_ray.engine.evidence import DEFAULT_MAX_NEW_TOKENS, DecodeLoop, EvidenceEngine, EvidenceResult, Sequence

log = logging.getLogger("prism_ray")

INITIAL_POOL_TOKENS = 1024  # the slot pool's first length; it grows to the longest pair it is given


class QueueFull(RuntimeError):
    """The scheduler holds max_active_pairs + max_queued_pairs pairs already."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before this pair finished."""


@dataclass(frozen=True)
class StepReport:
    """What one step of the loop did, for metrics (`Scheduler(observer=...)`)."""

    active: int  # slots decoding after the step
    queued: int  # pairs waiting for a slot after the step
    seconds: float  # the step's wall time (admission, prefill and decode window)
    decode_steps: int  # decode steps in its window (0: nothing was decoding)
    first_token_s: list[float]  # time from submit to first token, of the pairs prefilled in this step
    last_token_s: list[float]  # time from submit to the end, of the pairs that finished in this step


class GenerationHandle:
    """One submitted pair: await it (or `result()`), follow its text (`deltas()`, `on_text`), `cancel()` it."""

    def __init__(self, seq: Sequence | None, scheduler: Scheduler, on_text: Callable[[str], None] | None):
        self.seq = seq
        self._scheduler = scheduler
        self._future: concurrent.futures.Future[EvidenceResult] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._sent = ""  # text passed to listeners so far
        self._published_at = float("-inf")  # when the loop last offered new text (time.monotonic)
        self._listeners: list[Callable[[str | None], None]] = []
        if on_text is not None:
            self._listeners.append(lambda t: None if t is None else on_text(t))

    # -- the result ---------------------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> EvidenceResult:
        """Blocks until the answer is complete. Raises `concurrent.futures.CancelledError` after `cancel()`,
        or what failed the pair's step."""
        return self._future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    @property
    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """The answer is no longer wanted: it leaves the queue at once, or its slot at the loop's next step."""
        if self.seq is not None:
            self.seq.cancelled = True
        with self._lock:
            self._future.cancel()
            self._notify(None)
        self._scheduler._wake()

    # -- text as it is written ------------------------------------------------------------------------------
    async def deltas(self) -> AsyncIterator[str]:
        """The answer's text as it is written: each item is the text new since the last one (at each host
        sync); together they are the result's `text`. Ends when the answer does (await the handle for it)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        with self._lock:
            if self._sent:
                queue.put_nowait(self._sent)
            if self._future.done():
                queue.put_nowait(None)
            else:
                self._listeners.append(lambda t: loop.call_soon_threadsafe(queue.put_nowait, t))
        while (piece := await queue.get()) is not None:
            yield piece

    def _notify(self, piece: str | None) -> None:
        """Each listener gets `piece`; one that raises (a callback's bug, a reader whose event loop has
        closed) is dropped and logged, since it runs on the loop's thread: it must not stop the decode of
        every pair, nor this pair's own result."""
        failed = []
        for listener in self._listeners:
            try:
                listener(piece)
            except Exception:  # noqa: BLE001 - see above
                log.exception("a text listener failed; it gets no more text")
                failed.append(listener)
        for listener in failed:
            self._listeners.remove(listener)

    def _publish(self, text: str, final: bool = False) -> None:
        """New text for the listeners (text decoded so far). A trailing partial character is held back until
        it completes, except at the end: it decodes as one U+FFFD, so only the last one is held. Any before
        it can no longer complete; holding those too would silence, until its end, a stream whose model
        writes a run of invalid bytes."""
        if not final and text.endswith("\ufffd"):
            text = text[:-1]
        with self._lock:
            if text.startswith(self._sent) and len(text) > len(self._sent):
                piece, self._sent = text[len(self._sent):], text
                self._notify(piece)

    def _finish(self, result: EvidenceResult | None, error: BaseException | None = None) -> None:
        if result is not None:
            self._publish(result.text, final=True)
        with self._lock:
            if not self._future.done():
                if error is not None:
                    self._future.set_exception(error)
                elif result is not None:
                    self._future.set_result(result)
                else:
                    self._future.cancel()
            self._notify(None)
            self._listeners.clear()


# Text is passed to a pair's listeners at most this often (and always at its first sync and its end): a CPU
# syncs every step, 100 times a second or more, and a piece per step per stream is a Ray object per token
# between replica and router, load that a streaming client gains nothing from.
STREAM_INTERVAL_S = 0.05


class Scheduler:
    def __init__(self, engine: EvidenceEngine | Callable[[], EvidenceEngine], max_active_pairs: int = 16,
                 max_queued_pairs: int | None = 64, torch_threads: int | None = None,
                 observer: Callable[[StepReport], None] | None = None, stream_interval_s: float = STREAM_INTERVAL_S):
        """`engine`: the EvidenceEngine, or a function that builds it. A function is called on the loop's
        thread (the constructor waits for it and raises what it raised), so the engine is loaded, warmed up
        and run on one thread: a process whose torch work runs on two threads has two OpenMP teams, and with
        more team threads than CPUs libgomp makes them sleep between parallel regions
        (`benchmarks/bench_compute_thread.py`). Servers and batch actors pass a function.
        `max_queued_pairs=None`: no bound on waiting pairs (a batch job that submits a bucket at once).
        `torch_threads`: the loop thread's torch thread count (default: the creating thread's). `observer` gets a `StepReport` after each step
        (on the loop's thread: keep it cheap). `stream_interval_s`: the least time between two pieces of
        one pair's text (0: a piece at every host sync)."""
        if max_active_pairs < 1:
            raise ValueError("max_active_pairs must be >= 1")
        if max_queued_pairs is not None and max_queued_pairs < 0:
            raise ValueError("max_queued_pairs must be >= 0 (or None: unbounded)")
        self.max_active_pairs, self.max_queued_pairs = max_active_pairs, max_queued_pairs
        self.stream_interval_s = stream_interval_s
        self._observer = observer
        self._torch_threads = torch_threads or torch.get_num_threads()
        self._handles: dict[int, GenerationHandle] = {}  # id(seq) -> handle, for every pair not yet finished
        self._incoming: list[Sequence] = []
        self._cv = threading.Condition()
        self._closed = False
        self._busy_since: float | None = None
        self._died: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, ready), name="prism-scheduler", daemon=True)
        self._thread.start()
        ready.wait()
        if self._died is not None:  # the engine (or its decode loop's pool) could not be built
            raise self._died

    # -- callers' side --------------------------------------------------------------------------------------
    def submit(self, query: str, document: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, seed: int | None = None,
               on_text: Callable[[str], None] | None = None) -> GenerationHandle:
        """Queue one pair; returns at once. Raises ValueError for a bad pair, `QueueFull` when the scheduler
        holds `max_active_pairs + max_queued_pairs` pairs, `SchedulerClosed` after `close()`. `on_text(piece)`
        is called (on the loop's thread) with each piece of new text."""
        seq = self.engine.sequence(query, document, max_new_tokens, temperature, seed)  # tokenizes: off the lock
        handle = GenerationHandle(seq, self, on_text)
        self._enqueue([handle])
        return handle

    def submit_many(self, pairs: list[tuple[str, str]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    temperature: float = 0.0, seed: int | None = None) -> list[GenerationHandle]:
        """Queue pairs all at once (a batch job's bucket): the loop sees them in one step, so an idle pool
        fills in one admission, as `EvidenceEngine.generate` fills it. A bad pair's handle raises its
        ValueError; `QueueFull` (for all of them) when they do not fit. Pair i samples with `seed + i`."""
        handles, good = [], []
        for i, (query, document) in enumerate(pairs):
            try:
                seq = self.engine.sequence(query, document, max_new_tokens, temperature,
                                           None if seed is None else seed + i)
            except ValueError as exc:
                handles.append(GenerationHandle(None, self, None))
                handles[-1]._finish(None, exc)
                continue
            handles.append(GenerationHandle(seq, self, None))
            good.append(handles[-1])
        self._enqueue(good)
        return handles

    def _enqueue(self, handles: list[GenerationHandle]) -> None:
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            if self.max_queued_pairs is not None and \
                    len(self._handles) + len(handles) > self.max_active_pairs + self.max_queued_pairs:
                raise QueueFull(f"{self.active} pairs decoding and {self.queued} waiting: the limits are "
                                f"max_active_pairs={self.max_active_pairs} and max_queued_pairs={self.max_queued_pairs}")
            for h in handles:
                self._handles[id(h.seq)] = h
                self._incoming.append(h.seq)
            self._cv.notify()

    @property
    def active(self) -> int:
        """Pairs decoding now (slots in use)."""
        return len(self._loop.active)

    @property
    def queued(self) -> int:
        """Pairs submitted and not yet decoding."""
        return max(0, len(self._handles) - self.active)

    def check(self, wedged_after_s: float) -> None:
        """Raises when the loop thread died, or one step has run longer than `wedged_after_s` (a stuck kernel):
        a server's health check calls it, so the replica is replaced."""
        if self._died is not None or not self._thread.is_alive():
            raise RuntimeError(f"the scheduler's loop thread is not running ({self._died!r})")
        since = self._busy_since
        if since is not None and time.monotonic() - since > wedged_after_s:
            raise RuntimeError(f"a decode step has run for {time.monotonic() - since:.0f} s, past wedged_after_s="
                               f"{wedged_after_s:g}")

    def close(self) -> None:
        """Stop the loop; pairs not finished fail with `SchedulerClosed`."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)
        for handle in list(self._handles.values()):
            handle._finish(None, SchedulerClosed("the scheduler was closed before this pair finished"))
        self._handles.clear()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- the loop's thread -----------------------------------------------------------------------------------
    def _run(self, engine, ready: threading.Event) -> None:
        torch.set_num_threads(self._torch_threads)
        try:  # the engine and its slot pool are made here, on the one thread that runs them
            self.engine = engine() if callable(engine) else engine
            self._loop = DecodeLoop(self.engine, self.max_active_pairs, INITIAL_POOL_TOKENS)
        except BaseException as exc:  # noqa: BLE001 - raised by the constructor
            self._died = exc
            return
        finally:
            ready.set()
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._incoming and not self._loop.pending:
                        self._cv.wait()
                    if self._closed:
                        return
                    incoming, self._incoming = self._incoming, []
                for seq in incoming:
                    self._loop.add(seq)
                self._step()
        except BaseException as exc:  # noqa: BLE001 - a broken loop fails the health check
            self._died = exc
            log.exception("the evidence scheduler's loop died")
            raise

    def _step(self) -> None:
        started = time.monotonic()
        self._busy_since = started
        try:
            ended, first, steps = self._loop.step()
        except Exception as exc:  # noqa: BLE001 - the pairs of this step fail; the loop and the queue go on
            log.exception("a decode step failed; its pairs get the error")
            for seq in self._loop.fail_running():
                self._end(seq, None, exc)
            return
        finally:
            self._busy_since = None
        now = time.monotonic()
        for seq in ended:
            self._end(seq, None if seq.cancelled else self.engine.result(seq))
        for seq in self._loop.active:
            handle = self._handles.get(id(seq))
            if handle is not None and handle._listeners and now - handle._published_at >= self.stream_interval_s:
                handle._published_at = now
                handle._publish(self.engine.text(seq))
        if self._observer is not None:
            try:
                self._observer(StepReport(self.active, self.queued, now - started, steps,
                                          [s.first_token_at - s.submitted for s in first],
                                          [now - s.submitted for s in ended if not s.cancelled]))
            except Exception:  # noqa: BLE001 - metrics must not stop generation
                log.exception("the scheduler's observer failed")

    def _end(self, seq: Sequence, result: EvidenceResult | None, error: BaseException | None = None) -> None:
        with self._cv:
            handle = self._handles.pop(id(seq), None)
        if handle is not None:
            handle._finish(result, error)
