"""ScoreEngine: Prism relevance scores with one forward pass per document and a shared prefix.

Per query, the prefix (system prompt + instruction + query, ~200 tokens) is run once; its state
(attention K/V and Gated DeltaNet conv/recurrent states) is copied into each batch, and only the
document + suffix tokens (plus the few prefix tokens past the last 64-token chunk boundary, see
`loading.prefix_state`) are run per pair; the final layer runs only on each row's last token
(`last_token`). Rows are right-padded: a causal model never lets a real token see the pads after
it, so each row's last real token is exact, whereas pads placed between the prefix and the
document would decay the recurrent state. Only `(w_yes - w_no) · h_last` is
computed, never the full vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prism_ray.engine.batching import budget_batches
from prism_ray.engine.last_token import LastTokenForward
from prism_ray.engine.loading import LoadedModel, PrefixState, expand_state, load_model, prefix_state
from prism_ray.prompt import DEFAULT_MAX_LENGTH, EncodedPair

# Padded tokens per forward. On a 2-core CPU, 512-1024 was fastest of 512-8192 (bench preset; 8192
# took twice as long per pair); GPUs want far larger batches.
DEFAULT_TOKEN_BUDGET = {"cpu": 1024, "cuda": 16384}


@dataclass(frozen=True)
class ScoreResult:
    score: float  # sigmoid(logit)
    logit: float  # l_yes - l_no
    num_tokens: int  # whole prompt, after truncation
    truncated: bool  # the document was cut to fit max_length


def validate_group(query, documents) -> None:
    """Raise ValueError naming the field for input no engine call should see."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise ValueError("documents must be a list of strings")
    if len(documents) == 0:
        raise ValueError("documents must hold at least one document")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ValueError(f"documents[{i}] must be a string, not {type(doc).__name__}")


class ScoreEngine:
    """Scores (query, documents) groups. Construct from a local dir or hub id, or a LoadedModel."""

    def __init__(self, model: str | Path | LoadedModel, dtype: str | torch.dtype = "auto",
                 device: str | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 token_budget: int | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device, max_length)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.loaded.device.type, 8192)
        lm = self.loaded.model
        head = lm.get_output_embeddings().weight
        p = self.loaded.prompts
        self._score_vector = (head[p.yes_id] - head[p.no_id]).detach().clone()
        self._forward = LastTokenForward(self.loaded.backbone)

    @property
    def prompts(self):
        return self.loaded.prompts

    @torch.inference_mode()
    def score(self, groups: Sequence[tuple[str, Sequence[str]]],
              max_doc_tokens: int | None = None) -> list[list[ScoreResult]]:
        """One list of results per (query, documents) group, in the documents' order.

        Documents are cut to fit `max_length` with the prompt, and to `max_doc_tokens` if given.
        """
        for query, docs in groups:
            validate_group(query, docs)
        return [self._score_group(query, docs, max_doc_tokens) for query, docs in groups]

    def score_pairs(self, query: str, documents: Sequence[str]) -> list[ScoreResult]:
        return self.score([(query, documents)])[0]

    def _score_group(self, query: str, docs: Sequence[str], max_doc_tokens: int | None) -> list[ScoreResult]:
        prompts = self.loaded.prompts
        prefix = prompts.prefix(query)
        return self.score_encoded(prefix, [prompts.encode(query, d, prefix=prefix, max_doc_tokens=max_doc_tokens)
                                           for d in docs])

    @torch.inference_mode()
    def score_encoded(self, prefix: list[int], pairs: Sequence[EncodedPair]) -> list[ScoreResult]:
        """Scores pairs of one query that the caller already encoded (`prompts.encode(..., prefix=prefix)`).

        For callers that tokenize anyway, such as a Serve replica sizing its batches by tokens.
        """
        state = prefix_state(self.loaded, prefix)
        logits: list[float] = [0.0] * len(pairs)
        tails = [state.tail(p.ids) for p in pairs]
        for batch in budget_batches([len(t) for t in tails], self.token_budget):
            for i, value in zip(batch, self._forward_tails(state, [tails[i] for i in batch])):
                logits[i] = value
        return [_result(pair, logit) for pair, logit in zip(pairs, logits)]

    def _forward_tails(self, state: PrefixState, tails: list[list[int]]) -> list[float]:
        """Logit differences for document+suffix rows continuing from one prefix state."""
        device = self.loaded.device
        width = max(len(t) for t in tails)
        ids = torch.full((len(tails), width), self.loaded.prompts.pad_id, dtype=torch.long)
        for row, tail in enumerate(tails):
            ids[row, : len(tail)] = torch.tensor(tail)
        last = torch.tensor([len(t) - 1 for t in tails])
        positions = torch.arange(state.cached_len, state.cached_len + width).expand(len(tails), -1)
        hidden = self._forward(ids.to(device), positions.to(device), expand_state(state, len(tails)),
                               state.cached_len, last.to(device))
        return (hidden.float() @ self._score_vector.float()).tolist()


def _result(pair: EncodedPair, logit: float) -> ScoreResult:
    return ScoreResult(score=sigmoid(logit), logit=logit, num_tokens=pair.num_tokens, truncated=pair.truncated)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
