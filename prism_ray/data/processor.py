"""The Dataset -> Dataset processor: Prism reranking as one step of a user's own Ray Data pipeline.

    wide:  [preprocess] ─► map_batches(ScoreActor pool) [─► map_batches(EvidenceActor pool)] ─► [postprocess]
    long:  [preprocess] ─► mark (tasks) ─► groupby(query group).map_groups(ScoreActor pool)
                                      [─► map_batches(EvidenceActor pool)] ─► [postprocess]

Nothing runs until the returned Dataset is consumed (`take`, `iter_batches`, `write_*`), and it
streams: a block at a time. In the long layout a query's rows are hashed on its id into one of
`num_groups` groups, so an actor sees all of them in one call (the prefix state is computed once, the
rank is within the query). Which documents get evidence is decided when they are ranked, so the
evidence stage is a plain map over the scored rows, on actors of its own (the evidence tier's GPUs).
The batch job (`prism_ray.batch`) runs these very stages, with a sink that writes each bucket.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from prism_ray.data.rows import LONG, ColumnNames, InputError, bucket_of, pair_error
from prism_ray.config import ModelConfig, TierConfig
from prism_ray.data.config import PrismProcessorConfig
from prism_ray.data.work import BUCKET, ERROR, EvidenceActor, ScoreActor, Stage, require_columns
from prism_ray.factory import deployment_name, pin_checkpoint

SERVE_CLIENT_OPTIONS = {"num_cpus": 0.25}  # an actor that only holds deployment handles
MAX_SHUFFLE_PARTITIONS = 64  # a partition holds whole query groups; more only adds shuffle tasks

Row = dict


class Processor:
    """Built by `build_processor`; `processor(ds)` is a new, lazy Dataset of the reranked rows."""

    def __init__(self, config: PrismProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                 postprocess: Callable[[Row], Row] | None = None):
        self.config = config
        self.model = prepare_model(config)
        self.preprocess = preprocess
        self.postprocess = postprocess

    def __call__(self, ds):
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        if self.config.layout == LONG:
            ds = ds.map_batches(mark_pairs, batch_format="pyarrow", zero_copy_batch=True,
                                fn_kwargs={"cols": self.config.columns, "num_groups": self.config.num_groups})
        ds = self.stages(ds)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds

    def stages(self, ds, sink=None):
        """The model stages over `ds`; in the long layout its rows carry `_bucket` and `_error` already.
        With a sink (the batch job) the last stage writes each bucket and yields one summary row per bucket."""
        cfg, model = self.config, self.model
        stage = self.stage(sink)
        partitions = min(sink.num_buckets if sink else cfg.num_groups, MAX_SHUFFLE_PARTITIONS)
        spec = model.model_dump(mode="json")
        scorer = dict(fn_constructor_args=(spec, stage), batch_format="pyarrow",
                      compute=_pool(cfg.actor_range("scorer", model.scorer)), **self._options(model.scorer))
        if cfg.layout == LONG:
            ds = ds.groupby(BUCKET, num_partitions=partitions).map_groups(ScoreActor, **scorer)
        else:
            ds = ds.map_batches(ScoreActor, batch_size=cfg.batch_size, **scorer)
        if cfg.evidence is None:
            return ds
        evidence = dict(fn_constructor_args=(spec, stage), batch_format="pyarrow",
                        compute=_pool(cfg.actor_range("evidence", model.evidence)), **self._options(model.evidence))
        if sink is not None:  # the bucket's file is written whole, so the stage needs whole buckets
            return ds.groupby(BUCKET, num_partitions=partitions).map_groups(EvidenceActor, **evidence)
        return ds.map_batches(EvidenceActor, **evidence)

    def stage(self, sink=None) -> Stage:
        cfg = self.config
        ev = cfg.evidence
        return Stage(layout=cfg.layout, columns=cfg.columns, serve_app=cfg.serve_app, sink=sink,
                     evidence_top_k=ev.top_k if ev else None, evidence_min_score=ev.min_score if ev else None,
                     max_new_tokens=ev.max_new_tokens if ev else 256, temperature=ev.temperature if ev else 0.0,
                     chunking=cfg.chunking.model_dump(exclude_none=True) if cfg.chunking else None)

    def _options(self, tier: TierConfig | None) -> dict:
        """An actor's resources: the tier's, with the config's num_gpus / num_cpus over them."""
        if self.config.serve_app or tier is None:
            return dict(SERVE_CLIENT_OPTIONS)
        options = dict(tier.ray_actor_options)
        for key in ("num_gpus", "num_cpus"):
            if getattr(self.config, key) is not None:
                options[key] = getattr(self.config, key)
        return options


def build_processor(config: PrismProcessorConfig | dict, preprocess: Callable[[Row], Row] | None = None,
                    postprocess: Callable[[Row], Row] | None = None) -> Processor:
    """A processor for `config`; `preprocess` / `postprocess` map each row before and after reranking.

    >>> import ray
    >>> from prism_ray.data import build_processor
    >>> rerank = build_processor({"model": "checkpoints/tiny", "layout": "wide"})
    >>> ds = ray.data.from_items([{"query": "What is water?", "documents": ["Water is H2O.", "Paris"]}])
    >>> rerank(ds).filter(lambda row: row["scores"][0] > 0.5).take(1)  # doctest: +SKIP
    """
    if not isinstance(config, PrismProcessorConfig):
        config = PrismProcessorConfig.model_validate(config)
    return Processor(config, preprocess, postprocess)


def prepare_model(cfg: PrismProcessorConfig) -> ModelConfig:
    """The config's model, checked against what the stages need; a local checkpoint path made absolute
    (and a test checkpoint built) here, once, before any actor starts."""
    model = cfg.resolve_model()
    if cfg.serve_app:
        _check_serve_app(cfg.serve_app, model, evidence=cfg.evidence is not None)
        return model
    if cfg.evidence and model.evidence is None:
        raise InputError(f"model {model.name!r} has no evidence tier configured, so it cannot generate evidence")
    return pin_checkpoint(model)


def _check_serve_app(app: str, model: ModelConfig, evidence: bool) -> None:
    from ray import serve

    apps = serve.status().applications
    if app not in apps:
        raise InputError(f"no running Serve app {app!r}; running apps: {sorted(apps)}")
    deployments = apps[app].deployments
    for tier in ("scorer", "evidence") if evidence else ("scorer",):
        name = deployment_name(model.name, tier)
        if name not in deployments:
            raise InputError(f"Serve app {app!r} has no deployment {name}; it has {sorted(deployments)}")


def _pool(size: tuple[int, int]):
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])


def mark_pairs(table: pa.Table, cols: ColumnNames, num_groups: int) -> pa.Table:
    """Long rows with their query group (`_bucket`) and what makes each unscorable (`_error`, null if fine)."""
    require_columns(table, cols, ("query_id", "query", "text"), LONG)
    qids = table.column(cols.query_id).to_pylist()
    errors = [pair_error(q, t) for q, t in zip(table.column(cols.query).to_pylist(),
                                               table.column(cols.text).to_pylist())]
    return (table.append_column(BUCKET, pa.array([bucket_of(q, num_groups) for q in qids], pa.int64()))
            .append_column(ERROR, pa.array(errors, pa.string())))
