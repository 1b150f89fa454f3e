"""One typed config for models and their tiers, read by the Serve app and batch jobs alike.

A Serve config file's `args:` block is an `AppConfig`; pydantic errors name the bad field
(`models.0.scorer.max_batch_tokens: Input should be greater than 0`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prism_ray.checkpoints import PRESETS, find_released
from prism_ray.prompt import DEFAULT_MAX_LENGTH


class _Strict(BaseModel):
    """Unknown fields are errors. `_renamed` maps a field an older config may still use to the message
    that says what replaced it, so an old config is refused by name rather than as a bare extra field."""

    model_config = ConfigDict(extra="forbid")
    _renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed_fields(cls, data):
        if isinstance(data, dict):
            for old, message in cls._renamed.items():
                if old in data:
                    raise ValueError(message)
        return data


class TierConfig(_Strict):
    """One Serve deployment (or one batch actor pool): its replicas, resources and compute threads."""

    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    num_replicas: int | None = Field(default=None, ge=1, description="fixed count; omit to autoscale")
    autoscaling_config: dict[str, Any] | None = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4})
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1, description="-1: unbounded")
    torch_threads: int | None = Field(default=None, ge=1)
    graceful_shutdown_timeout_s: float = Field(
        default=30, ge=0, description="a replica being stopped (scale-down, redeploy) finishes its requests "
                                      "for up to this long before it is killed")
    wedged_after_s: float = Field(
        default=300, gt=0, description="check_health fails (and Serve restarts the replica) when one engine "
                                      "call has run longer than this")

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self):
        if self.num_replicas is not None:
            self.autoscaling_config = None
        return self

    @property
    def min_replicas(self) -> int:
        """The replicas this tier keeps even when idle (0: it scales to zero)."""
        if self.num_replicas is not None:
            return self.num_replicas
        return int((self.autoscaling_config or {}).get("min_replicas", 1))

    def deployment_options(self, name: str) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "name": name,
            "ray_actor_options": self.ray_actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        else:
            opts["autoscaling_config"] = self.autoscaling_config
        return opts


class ScorerTierConfig(TierConfig):
    """The scorer tier: one forward pass per document.

    Two token limits, named by what they count:

    - `max_batch_tokens`: tokens of engine work that the scorer's batcher gathers from concurrent requests
      into one engine call, the least served waiting request's items first: each pair's prompt less the
      shared head (system prompt, instruction and, on a CPU, the query) its row reads from a cached state.
      4096 gathers, say, two requests of 10 documents x 200 tokens; a request larger than the budget is split
      into items that each fit. A pair longer than `engine_token_budget` runs one piece of at most that
      budget per engine call, so other requests' items run between its pieces; at most
      `max_batch_tokens // engine_token_budget` such pairs (at least one) are part-way at once, which bounds
      the state a replica holds between pieces.
    - `engine_token_budget`: prompt tokens in one forward pass inside that call (rows are packed, not padded).
      Unset, the engine picks by device: 1024 on CPU, 16384 on CUDA. A gathered batch of 4096 tokens
      at a budget of 1024 runs as about four forwards.
    """

    max_batch_tokens: int = Field(default=4096, gt=0, description="tokens of engine work (prompt tokens past the "
                                                                  "shared cached head) gathered per engine call")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, description="how long the first request to find the engine idle waits for others to join "
                                       "its batch; 0: it starts at once, and what arrives while a batch computes "
                                       "gathers into the next (benchmarks/bench_serve_path.py: 5 ms of wait was "
                                       "5 ms more latency per request at one client)")
    engine_token_budget: int | None = Field(
        default=None, gt=0, description="prompt tokens per forward pass (packed rows); unset: 1024 on CPU, 16384 on CUDA")
    max_passed_over: int = Field(
        default=8, ge=1, description="batches a waiting request may be passed over (others were served less) before "
                                     "it is overdue; one batch in every max_passed_over + 1 goes to an overdue "
                                     "request first, so large requests together get at least that share while "
                                     "small ones keep the rest (deployments/fair_batch.py)")


class EvidenceTierConfig(TierConfig):
    """The evidence tier: generation for the few documents a caller asks evidence for.

    Each replica runs one decode loop (`prism_ray.engine.Scheduler`) that requests join between decode
    steps and leave at their own end:

    - `max_active_pairs`: (query, document) pairs decoding at once, the slots of the replica's pool.
    - `max_queued_pairs`: pairs more that may wait for a slot; past both, a request is answered 503
      `saturated` with Retry-After at once instead of queueing without end.
    - Serve's own bounds follow unless set: `max_ongoing_requests` (requests at one replica) is their sum,
      so a router sends a replica what its scheduler may hold, and `max_queued_requests` (requests a router
      holds while every replica is full, or while the first one starts) is `max_queued_pairs`; past those,
      503 `saturated` too. Several routers each send up to `max_ongoing_requests`: the scheduler's own
      bound is what holds then.
    """

    max_active_pairs: int = Field(default=16, gt=0, description="pairs decoding at once (slots per replica)")
    max_queued_pairs: int = Field(default=64, ge=0, description="pairs waiting for a slot per replica; past it, 503")
    cuda_graphs: bool | None = Field(default=None, description="replay each decode step from a CUDA graph (one per "
                                                               "batch-size bucket); unset: on for CUDA devices")
    _renamed = {
        "max_batch_pairs": "max_batch_pairs is gone: the evidence tier schedules per decode step; use "
                           "max_active_pairs (pairs decoding at once, default 16) and max_queued_pairs (pairs "
                           "waiting for a slot, default 64)",
        "max_batch_tokens": "max_batch_tokens is not an evidence-tier setting: the evidence tier schedules pairs, "
                            "not tokens; use max_active_pairs (pairs decoding at once, default 16) and "
                            "max_queued_pairs (pairs waiting for a slot, default 64)",
        "batch_wait_timeout_s": "batch_wait_timeout_s is not an evidence-tier setting: requests join the running "
                                "decode at its next step, without a wait; size the tier with max_active_pairs and "
                                "max_queued_pairs",
    }

    @model_validator(mode="after")
    def _serve_bounds_from_pairs(self):
        if "max_ongoing_requests" not in self.model_fields_set:
            self.max_ongoing_requests = self.max_active_pairs + self.max_queued_pairs
        if "max_queued_requests" not in self.model_fields_set:
            self.max_queued_requests = max(1, self.max_queued_pairs)
        return self


class ModelConfig(_Strict):
    """A checkpoint and its two tiers."""

    name: str = Field(min_length=1, description="what clients put in `model`")
    model: str = Field(min_length=1, description="local checkpoint dir or hub id")
    size: str | None = Field(default=None, description='routing key such as "0.8b"; from the registry if omitted')
    build_preset: str | None = Field(default=None, description="build this test preset at `model` if missing")
    dtype: str = Field(default="auto", description='"auto", "float32" or "bfloat16"')
    device: str | None = Field(default=None, description='"cpu", "cuda", "cuda:1"; unset: CUDA when present')
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=64, description="tokens of a whole prompt")
    kernels: dict[str, str] = Field(default_factory=dict, description='per-op kernel overrides of the device defaults, '
                                    'e.g. {"attention": "padded", "gated_delta_rule": "fla"} (prism_ray.engine.kernels)')
    scorer: ScorerTierConfig = Field(default_factory=ScorerTierConfig)
    evidence: EvidenceTierConfig | None = Field(default_factory=EvidenceTierConfig)

    @field_validator("kernels")
    @classmethod
    def _known_kernels(cls, v):
        if v:
            from prism_ray.engine.kernels import validate  # torch, only where a config names kernels

            return validate(v)
        return v

    @model_validator(mode="after")
    def _graphs_need_cuda(self):
        if self.evidence is not None and self.evidence.cuda_graphs and (self.device or "").startswith("cpu"):
            raise ValueError("evidence.cuda_graphs needs a CUDA device, and device is 'cpu'")
        return self

    @field_validator("build_preset")
    @classmethod
    def _known_preset(cls, v):
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {sorted(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _default_size(self):
        if self.size is None:
            released = find_released(self.model)
            self.size = released.size if released else None
        if self.size is not None:
            self.size = self.size.lower()
        return self

    @property
    def backbone(self) -> str | None:
        released = find_released(self.model)
        if released:
            return released.backbone
        if self.build_preset:
            return "Qwen3" if self.build_preset.startswith("qwen3-") else "Qwen3.5"
        config = Path(self.model) / "config.json"
        if config.is_file():
            model_type = json.loads(config.read_text()).get("model_type", "")
            return {"qwen3": "Qwen3", "qwen3_5_text": "Qwen3.5", "qwen3_5": "Qwen3.5"}.get(model_type, model_type)
        return None


class LimitsConfig(_Strict):
    """What one request may ask. Each is stated in the OpenAPI schema and enforced with a 4xx naming it."""

    max_documents: int = Field(default=1000, ge=1, description="documents in one request (413 past it)")
    max_query_chars: int = Field(
        default=2048, ge=1, description="characters (Unicode code points) in a query (422 past it); a query "
                                        "must also leave room for a document under the model's max_length")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="bytes of a request body (413), "
                                                                              "whatever its framing")
    body_timeout_s: float = Field(
        default=10, gt=0, description="seconds a body may take to arrive (408 past it); reading it counts against "
                                      "request_timeout_s too")
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="bytes of request bodies a router replica holds at once, "
                                                        "counted as they are read (429 past it)")
    max_json_depth: int = Field(default=32, ge=4, description="levels of nesting in a JSON body (422 past it)")
    max_new_tokens: int = Field(default=512, ge=1, description="tokens generated per evidence document")
    max_evidence_documents: int = Field(default=32, ge=1, description="evidence.top_n per request")
    max_in_flight: int = Field(default=256, ge=1, description="requests a router replica holds before 429")
    retry_after_s: int = Field(default=1, ge=1, description="the Retry-After of a 429 or 503")
    max_chunks_per_doc: int = Field(default=64, ge=1, description="chunking.max_chunks_per_doc (422 past it)")
    max_chunks_per_request: int = Field(default=4096, ge=1, description="chunks of all documents of one request "
                                                                        "(413 past it)")
    max_chunk_tokens_per_request: int = Field(
        default=1024 * 1024, ge=1, description="tokens the chunks of one request may hold, counted as chunks x their "
                                               "size (chunk_tokens, or the room), the scoring work a request asks "
                                               "(413 past it; reading stops there)")
    request_timeout_s: float = Field(
        default=60, gt=0, description="deadline of one request, retries included: past it a 504 (type timeout), "
                                      "and its scorer and evidence calls are cancelled; a stream ends its "
                                      "unfinished documents with timeout error events")
    _renamed = {"max_query_tokens": "max_query_tokens is gone: a query is limited in characters, the unit the "
                                    "API schema can state; use max_query_chars"}


class RouterConfig(_Strict):
    num_replicas: int = Field(default=1, ge=1)
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.5})
    max_ongoing_requests: int = Field(default=512, ge=1)
    graceful_shutdown_timeout_s: float = Field(
        default=75, ge=0, description="a router being replaced finishes its requests (streams included) for "
                                      "up to this long; keep it above limits.request_timeout_s")


class AppConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    default_model: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    api_keys_env: str | None = Field(default="PRISM_API_KEYS", description="comma-separated keys")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)

    @model_validator(mode="after")
    def _names(self):
        names = [m.name for m in self.models]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"models: duplicate names {sorted(dupes)}")
        if self.default_model is None:
            self.default_model = names[0]
        elif self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of the models {names}")
        return self

    def resolved_api_keys(self) -> set[str]:
        keys = set(self.api_keys)
        if self.api_keys_env and os.environ.get(self.api_keys_env):
            keys |= {k.strip() for k in os.environ[self.api_keys_env].split(",") if k.strip()}
        return keys

    def find_model(self, key: str | None) -> ModelConfig | None:
        """By configured name, hub id / path, or size ("0.8b"); None picks the default."""
        return find_model(self.models, self.default_model if key is None else key)


def find_model(models: list[ModelConfig], key: str) -> ModelConfig | None:
    """By configured name first, then hub id / path, then size ("0.8b"); ASCII letters in any case."""
    k = _fold(key)
    for by in (lambda m: m.name, lambda m: m.model, lambda m: m.size):
        for m in models:
            if by(m) and _fold(by(m)) == k:
                return m
    return None


def _fold(s: str) -> str:
    """Lower-cases ASCII letters only, exactly what the API schema's model pattern admits."""
    return "".join(c.lower() if c.isascii() else c for c in s)


class ConfigFileError(ValueError):
    """A config file cannot be read or validated; the message names the file and the field."""


APP_IMPORT_PATH = "deployments.app:build_app"


def read_serve_config(path: str | Path) -> dict:
    """A Serve config file, with every prism-ray application's `args` validated as an AppConfig."""
    doc = read_yaml(path)
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not apps:
        raise ConfigFileError(f"{path}: no 'applications' list; expected a Serve config file")
    for i, application in enumerate(apps):
        if str(application.get("import_path", "")) == APP_IMPORT_PATH:
            validated(AppConfig, application.get("args") or {}, f"{path}: applications.{i}.args")
    return doc


def serve_config_models(path: str | Path) -> list[ModelConfig]:
    """Every model of every prism-ray application in a Serve config file (batch jobs reuse them)."""
    return [m for application in read_serve_config(path)["applications"]
            if application.get("import_path") == APP_IMPORT_PATH
            for m in AppConfig.model_validate(application.get("args") or {}).models]


def serve_config_limits(path: str | Path) -> dict[str, LimitsConfig]:
    """The limits of every prism-ray application in a Serve config file, by its route prefix (Serve's
    default "/"): what the proxy's body guard applies to the paths under each."""
    return {application.get("route_prefix") or "/": AppConfig.model_validate(application.get("args") or {}).limits
            for application in read_serve_config(path)["applications"]
            if application.get("import_path") == APP_IMPORT_PATH}


def validated(schema: type[BaseModel], data: Any, where: str):
    """`schema.model_validate(data)`, with the first error as one line naming the field."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigFileError(f"{where}.{field}: {first['msg']}" if field else f"{where}: {first['msg']}") from None


def read_yaml(path: str | Path):
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
