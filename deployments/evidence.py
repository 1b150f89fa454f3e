"""Evidence tier: generation for the few documents a caller wants evidence for.

`@serve.batch` gathers pairs from concurrent requests so that one decode loop serves them all;
pairs are grouped by their generation settings inside a gathered batch. A request cancelled by its
caller (deadline, disconnect: Serve cancels the handle call) marks its pair, and the decode loop drops
it at its next host sync, so an abandoned generation stops costing steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from ray import serve

from deployments.threads import ComputeThread
from prism_ray import metrics
from prism_ray.config import ModelConfig
from prism_ray.factory import build_engine

logger = logging.getLogger("ray.serve")


@dataclass
class _Pair:
    query: str
    document: str
    max_new_tokens: int
    temperature: float
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)


@serve.deployment
class Evidence:
    def __init__(self, model: dict):
        self.config = ModelConfig.model_validate(model)
        tier = self.config.evidence
        self._compute = ComputeThread(tier.torch_threads, tier.wedged_after_s)
        self.engine = build_engine(self.config, "evidence")
        self._batched.set_max_batch_size(tier.max_batch_pairs)
        self._batched.set_batch_wait_timeout_s(tier.batch_wait_timeout_s)

    async def generate(self, query: str, document: str, max_new_tokens: int, temperature: float = 0.0) -> dict:
        """score, logit, relevant, contribution, evidence, text, truncated for one pair."""
        pair = _Pair(query, document, max_new_tokens, temperature)
        try:
            return await self._batched(pair)
        except asyncio.CancelledError:
            logger.info("evidence request cancelled by its caller; its decode stops at the next sync")
            pair.cancelled.set()
            metrics.count("prism_cancelled_total", model=self.config.name, tier="evidence")
            raise

    def check_health(self) -> None:
        """Serve's periodic health check: fails when the engine is wedged (see deployments.threads)."""
        self._compute.check()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, pairs: list[_Pair]) -> list[dict]:
        now = time.monotonic()
        name = self.config.name
        for p in pairs:
            metrics.observe("prism_queue_wait_seconds", now - p.enqueued, metrics.SECONDS_BUCKETS, model=name, tier="evidence")
        metrics.observe("prism_batch_pairs", len(pairs), metrics.SIZE_BUCKETS, model=name, tier="evidence")
        results = await self._compute.run(self._generate, pairs)
        metrics.count("prism_evidence_generated_total", len(results), model=name)
        metrics.count("prism_tokens_total", sum(r["generated_tokens"] for r in results), model=name, tier="evidence")
        return results

    def _generate(self, pairs: list[_Pair]) -> list[dict]:
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault((p.max_new_tokens, p.temperature), []).append(i)
        out: list[dict] = [{} for _ in pairs]
        for (max_new_tokens, temperature), idxs in groups.items():
            res = self.engine.generate([(pairs[i].query, pairs[i].document) for i in idxs],
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       should_stop=lambda k, idxs=idxs: pairs[idxs[k]].cancelled.is_set())
            for i, r in zip(idxs, res):
                out[i] = {"score": r.score, "logit": r.logit, "relevant": r.relevant, "contribution": r.contribution,
                          "evidence": r.evidence, "text": r.text, "truncated": r.truncated,
                          "generated_tokens": r.generated_tokens}
        return out
