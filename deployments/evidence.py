"""Evidence tier: generation for the few documents a caller wants evidence for.

Each replica runs one `prism_ray.engine.Scheduler`: every call submits its pair and awaits it, and the pair
joins the replica's running decode at its next step, so a short answer never waits for a long one. A full
scheduler (`max_active_pairs` decoding, `max_queued_pairs` waiting) refuses the call at once with a
`saturated` error (the router answers 503 with Retry-After). A call cancelled by its caller (deadline,
disconnect: Serve cancels the handle call) cancels its pair, which leaves its slot at the loop's next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from ray import serve

from prism_ray import metrics
from prism_ray.config import ModelConfig
from prism_ray.engine import GenerationHandle, QueueFull, Scheduler, StepReport
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.factory import build_engine
from prism_ray.results import EvidenceResult

logger = logging.getLogger("ray.serve")


@serve.deployment
class Evidence:
    def __init__(self, model: dict):
        self.config = ModelConfig.model_validate(model)
        tier = self.config.evidence
        # built on the scheduler's loop thread, the one thread that runs the engine (see Scheduler)
        self.scheduler = Scheduler(functools.partial(build_engine, self.config, "evidence"), tier.max_active_pairs,
                                   tier.max_queued_pairs, torch_threads=tier.torch_threads, observer=self._observe)
        self.engine = self.scheduler.engine

    async def generate(self, query: str, document: str, max_new_tokens: int,
                       temperature: float = 0.0) -> EvidenceResult:
        """The engine's EvidenceResult for one pair (score, logit, contribution, evidence, text, ...)."""
        handle = await self._submit(query, document, max_new_tokens, temperature)
        try:
            return self._answer(await handle)
        except asyncio.CancelledError:
            self._cancelled(handle)
            raise

    async def generate_stream(self, query: str, document: str, max_new_tokens: int, temperature: float = 0.0):
        """`generate` as it is written (call with `handle.options(stream=True)`): the text new since the
        last item (a `str`) at each host sync, then the EvidenceResult (as `generate` returns)."""
        handle = await self._submit(query, document, max_new_tokens, temperature)
        try:
            async for piece in handle.deltas():
                yield piece
            yield self._answer(await handle)
        except (asyncio.CancelledError, GeneratorExit):
            self._cancelled(handle)
            raise

    def check_health(self) -> None:
        """Serve's periodic health check: fails when the decode loop died or one step is wedged."""
        self.scheduler.check(self.config.evidence.wedged_after_s)

    async def _submit(self, query, document, max_new_tokens, temperature) -> GenerationHandle:
        """Submit off the event loop (it tokenizes the document)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, lambda: self.scheduler.submit(query, document, max_new_tokens,
                                                                                  temperature))
        except QueueFull as exc:
            raise PrismError(ErrorKind.SATURATED, f"the evidence tier of model {self.config.name!r} is full: {exc}; "
                                                  "retry later") from None

    def _answer(self, result: EvidenceResult) -> EvidenceResult:
        name = self.config.name
        metrics.count("prism_evidence_generated_total", model=name)
        metrics.count("prism_tokens_total", result.generated_tokens, model=name, tier="evidence")
        return result

    def _cancelled(self, handle: GenerationHandle) -> None:
        if not handle.done:
            logger.info("evidence request cancelled by its caller; its pair leaves the decode at the next step")
            handle.cancel()
            metrics.count("prism_cancelled_total", model=self.config.name, tier="evidence")

    def _observe(self, report: StepReport) -> None:
        """Per step, on the scheduler's thread: slots in use, pairs waiting, step time, first and last token."""
        name = self.config.name
        metrics.gauge("prism_evidence_active_slots", report.active, model=name)
        metrics.gauge("prism_evidence_queued_pairs", report.queued, model=name)
        if report.decode_steps:
            metrics.observe("prism_decode_step_seconds", report.seconds / report.decode_steps,
                            metrics.SECONDS_BUCKETS, model=name)
        for s in report.first_token_s:
            metrics.observe("prism_time_to_first_token_seconds", s, metrics.LATENCY_BUCKETS, model=name)
        for s in report.last_token_s:
            metrics.observe("prism_time_to_last_token_seconds", s, metrics.LATENCY_BUCKETS, model=name)
