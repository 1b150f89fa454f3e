"""Loading a checkpoint (local dir or hub id) once, for either engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prism_ray.engine import linear
from prism_ray.engine.allocator import tune_allocator
from prism_ray.engine.cache_ops import merge, repeat_rows, split_rows
from prism_ray.engine.kernels import log_kernels
from prism_ray.engine.transfer import to_device
from prism_ray.prompt import DEFAULT_MAX_LENGTH, PrismPromptTokenizer


class ModelLoadError(RuntimeError):
    """The checkpoint could not be found or loaded; the message says which and why."""


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module  # a *ForCausalLM in eval mode
    prompts: PrismPromptTokenizer
    device: torch.device
    dtype: torch.dtype

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.model


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic in hardware: CUDA GPUs that support it, and CPUs with
    AVX512-BF16 or AMX (where bf16 matmuls run at about twice the fp32 rate; elsewhere torch emulates
    bf16 and it is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" means bf16 wherever the hardware computes it natively (what the model card serves with),
    fp32 elsewhere. Parity with the reference paths is defined (and tested) in "float32"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if computes_bf16_natively(device) else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}") from None


def load_model(model: str | Path, dtype: str | torch.dtype = "auto", device: str | None = None,
               max_length: int = DEFAULT_MAX_LENGTH) -> LoadedModel:
    """Load a Prism checkpoint from a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, dev)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise ModelLoadError(f"model directory {name!r} not found or has no config.json")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}".splitlines()[0]) from exc
    lm = lm.to(dev).eval()
    if dev.type == "cpu":
        tune_allocator()
        linear.install(lm)
    log_kernels(dev.type, "linear_attention" in (getattr(lm.config, "layer_types", None) or ()))
    return LoadedModel(name, lm, PrismPromptTokenizer(tok, max_length=max_length), dev, torch_dtype)


# The Gated DeltaNet reference kernels (HF's torch path and FLA's) scan in chunks of 64 tokens from
# the start of the sequence. A state cached at a chunk boundary continues with the very chunking of
# one full pass; one cached mid-chunk drifts by ~1e-5 in score (measured on test checkpoints), more
# than the parity we promise. So the cached prefix stops at the last multiple of 64 and the few
# remaining prefix tokens run with each document.
LINEAR_ATTENTION_CHUNK = 64


@dataclass
class PrefixState:
    """The model state after the first `cached_len` tokens of a query's prefix."""

    cached_len: int
    cache: object  # a transformers Cache holding attention K/V and linear-attention states

    def tail(self, ids: list[int]) -> list[int]:
        """The tokens of a whole prompt still to run after this state."""
        return ids[self.cached_len:]


def cached_length(loaded: LoadedModel, prefix_len: int) -> int:
    """How much of a prefix of `prefix_len` tokens its state holds (see LINEAR_ATTENTION_CHUNK); at least
    one token is left for the tail, so every prompt has a last position to read."""
    has_linear = "linear_attention" in (getattr(loaded.model.config, "layer_types", None) or ())
    align = LINEAR_ATTENTION_CHUNK if has_linear else 1
    return min((prefix_len // align) * align, prefix_len - 1)


def prefix_state(loaded: LoadedModel, prefix_ids: list[int]) -> PrefixState:
    """Run the shared prefix once (attention K/V, Gated DeltaNet conv/recurrent states)."""
    return prefix_states(loaded, [prefix_ids])[0]


def prefix_states(loaded: LoadedModel, prefixes: list[list[int]]) -> list[PrefixState]:
    """The states of several queries' prefixes; those whose cached lengths agree run as one batch."""
    out: list[PrefixState | None] = [None] * len(prefixes)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prefixes):
        by_length.setdefault(cached_length(loaded, len(ids)), []).append(i)
    for cached, members in by_length.items():
        ids = to_device(torch.tensor([prefixes[i][:cached] for i in members]), loaded.device)
        cache = loaded.backbone(input_ids=ids, use_cache=True).cache
        rows = [cache] if len(members) == 1 else split_rows(cache, len(members))
        for i, row in zip(members, rows):
            out[i] = PrefixState(cached, row)
    return out  # type: ignore[return-value]


def expand_state(state: PrefixState, batch_size: int):
    """A copy of a batch-1 prefix cache repeated `batch_size` times along the batch axis.

    The prefix cache is reused by every batch of its query, so each batch works on its own copy.
    """
    return repeat_rows(state.cache, batch_size)


@dataclass
class ContinuedRows:
    """A right-padded batch of token rows, each continuing from one query's prefix state (see `continue_rows`)."""

    ids: torch.Tensor  # (rows, width) on the device; pad id after each row's `ends[b]` tokens
    positions: torch.Tensor  # (rows, width) on the device; row b starts at its prefix's cached length
    ends: torch.Tensor  # (rows,) on the host: real tokens per row
    cache: object  # the rows' prefix states, one per row, as one batch (a copy)
    cached_len: int  # K/V slots in `cache`
    prefix_mask: torch.Tensor | None  # (rows, cached_len) on the host, 0 at left pads; None: no pads (one query)


def continue_rows(loaded: LoadedModel, states: list[PrefixState], slots: list[int], tails: list[list[int]]) -> ContinuedRows:
    """Rows `tails[b]` continuing from `states[slots[b]]`, right-padded into one batch. With one query, its
    state is repeated; with several, their states are merged (K/V left-padded and masked, Gated DeltaNet
    states stacked per row)."""
    device = loaded.device
    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), loaded.prompts.pad_id, dtype=torch.long)
    for row, tail in enumerate(tails):
        ids[row, : len(tail)] = torch.tensor(tail)
    used = sorted(set(slots))
    if len(used) == 1:
        state = states[used[0]]
        cache, cached_len, prefix_mask = expand_state(state, len(tails)), state.cached_len, None
    else:
        index = {s: k for k, s in enumerate(used)}
        cache, prefix_mask = merge([states[s].cache for s in used], [states[s].cached_len for s in used],
                                   rows=[index[s] for s in slots])
        cached_len = prefix_mask.shape[1]
    starts = torch.tensor([states[s].cached_len for s in slots])
    positions = starts[:, None] + torch.arange(width)[None]
    return ContinuedRows(to_device(ids, device), to_device(positions, device), torch.tensor([len(t) for t in tails]), cache,
                         cached_len, prefix_mask)
