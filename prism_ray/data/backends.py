"""Who does a Ray Data actor's model work: the engines, loaded in the actor (`EngineBackend`, the same
ScoreEngine / EvidenceEngine the Serve tiers wrap, built by the same factory), or a running Serve app's
scorer and evidence deployments, through deployment handles (`ServeBackend`). Both answer the same calls
with the engines' own result records, and an exception in place of a group or pair that failed.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

from prism_ray.config import ModelConfig
from prism_ray.factory import Tier, build_engine, deployment_name
from prism_ray.results import EvidenceResult, ScoreReply, ScoreResult


class EngineBackend:
    """The engines, in this process. Each actor loads only the engine its stage needs.

    Each engine is loaded and run on one thread (the scorer's own, the evidence scheduler's loop thread):
    Ray Data builds an actor on its main thread and calls it on another, and torch work on two threads makes
    two OpenMP teams, which libgomp makes sleep between parallel regions once they outnumber the CPUs
    (`prism_ray.engine.Scheduler`, `benchmarks/bench_compute_thread.py`)."""

    def __init__(self, model: ModelConfig, tier: Tier):
        self.model = model
        self.scorer = self.evidence = None
        if tier == "evidence":
            self.evidence = self.scheduler.engine
        else:  # the very factory the Serve tiers call
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-compute")
            self.scorer = self._thread.submit(build_engine, model, tier).result()
        self.prompts = (self.scorer or self.evidence).prompts

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[ScoreResult] | Exception]:
        return self._thread.submit(self._score, groups).result()

    def _score(self, groups: list[tuple[str, list[str]]]) -> list[list[ScoreResult] | Exception]:
        try:  # every query of the block in one engine call: their rows share forward passes
            return self.scorer.score(groups)
        except Exception:  # noqa: BLE001 - retry one group at a time so a bad one fails alone
            pass
        out: list[list[ScoreResult] | Exception] = []
        for query, docs in groups:
            try:
                out.append(self.scorer.score([(query, docs)])[0])
            except Exception as exc:  # noqa: BLE001 - recorded in the rows' error column
                out.append(exc)
        return out

    @functools.cached_property
    def scheduler(self):
        """The evidence engine's decode loop, as a Serve replica runs it, the engine built on its thread; no
        queue bound: a block's pairs are submitted at once, and the block bounds them."""
        from prism_ray.engine import Scheduler

        return Scheduler(functools.partial(build_engine, self.model, "evidence"), self.model.evidence.max_active_pairs,
                         max_queued_pairs=None)

    def generate(self, pairs: list[tuple[str, str]], max_new_tokens: int,
                 temperature: float) -> list[EvidenceResult | Exception]:
        """Every pair submitted at once: they share the decode loop's steps, and a bad one fails alone. A pair
        whose step failed is tried again on its own, in case another pair broke that step."""
        handles = self.scheduler.submit_many(pairs, max_new_tokens, temperature)
        out: list[EvidenceResult | Exception | None] = []
        for h in handles:
            try:
                out.append(h.result())
            except ValueError as exc:  # a bad pair: recorded in the rows' error column
                out.append(exc)
            except Exception:  # noqa: BLE001 - its step failed: tried alone below, once the loop is idle
                out.append(None)
        for i, pair in enumerate(pairs):
            if out[i] is None:
                try:
                    out[i] = self.scheduler.submit(*pair, max_new_tokens, temperature).result()
                except Exception as exc:  # noqa: BLE001
                    out[i] = exc
        return out


class ServeBackend:
    """A running Serve app's `<model>-scorer` / `<model>-evidence` deployments; requests go out together
    so the deployments' own batching gathers them with online traffic.

    The handle is called from an event loop of the backend's own (a daemon thread): a Ray Data actor is
    sync code, and under `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (`prism-ray serve --throughput-optimized`) Serve
    routes a handle's requests on the loop it is called from, so a handle called outside a running loop
    fails. On a loop of its own the same calls work in both of Serve's modes."""

    def __init__(self, model: ModelConfig, tier: str, app: str):
        from ray import serve

        self.handle = serve.get_deployment_handle(deployment_name(model.name, tier), app_name=app)
        self.model = model
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="prism-serve-handle", daemon=True).start()

    @functools.cached_property
    def prompts(self):
        """The model's prompt tokenizer, for cutting chunks here (the replicas hold their own)."""
        from transformers import AutoTokenizer

        from prism_ray.prompt import PrismPromptTokenizer

        return PrismPromptTokenizer(AutoTokenizer.from_pretrained(self.model.model), max_length=self.model.max_length)

    def score(self, groups):
        return [r.results if isinstance(r, ScoreReply) else r
                for r in self._gather("score", list(groups))]

    def generate(self, pairs, max_new_tokens, temperature):
        return self._gather("generate", [(q, d, max_new_tokens, temperature) for q, d in pairs])

    def _gather(self, method: str, calls: list[tuple]) -> list:
        """`handle.<method>.remote(*args)` for each args in `calls`, all at once, made and awaited on the
        backend's loop (the handle starts routing on first use, so that too happens there); a failed call's
        exception in its place (recorded in the rows' error column)."""
        async def all_of():
            return await asyncio.gather(*(getattr(self.handle, method).remote(*args) for args in calls),
                                        return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(all_of(), self._loop).result()
