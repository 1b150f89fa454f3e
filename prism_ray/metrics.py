"""Prometheus metrics (through `ray.util.metrics`) shared by the Serve tiers and batch actors.

Metric objects are created lazily so that importing this module never needs a Ray runtime.
"""

from __future__ import annotations

import functools


@functools.cache
def _metric(kind: str, name: str, description: str, tags: tuple[str, ...], boundaries: tuple[float, ...] = ()):
    from ray.util import metrics

    if kind == "counter":
        return metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description=description, tag_keys=tags)
    return metrics.Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tags)


def count(name: str, value: float = 1.0, **tags: str) -> None:
    if not value:  # nothing to count (Ray's Counter refuses an increment of 0)
        return
    _metric("counter", name, name.replace("_", " "), tuple(sorted(tags))).inc(value, tags=tags)


def gauge(name: str, value: float, **tags: str) -> None:
    _metric("gauge", name, name.replace("_", " "), tuple(sorted(tags))).set(value, tags=tags)


def observe(name: str, value: float, boundaries: tuple[float, ...], **tags: str) -> None:
    _metric("histogram", name, name.replace("_", " "), tuple(sorted(tags)), boundaries).observe(value, tags=tags)


SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds, up to a long generation
