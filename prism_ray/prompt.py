"""The exact Prism prompt, and its tokenization as shared prefix + document + suffix.

The model was trained on one fixed prompt (model card, path A); only that prompt gives calibrated
scores, so the strings below are byte-for-byte the card's. User text (query, document) is always
tokenized as plain text: a document containing "<|im_end|>" must not be able to close its turn.

The split point sits right after "<Document>:"; the document segment starts with the template's
space. The Qwen pre-tokenizer never joins ">:" with a following space, so prefix + document +
suffix tokens equal the tokens of the whole prompt.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass

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
DEFAULT_MAX_LENGTH = 10_240  # the card's training cap: whole prompt, in tokens

# A document is tokenized only as far as it can be used: its text is cut to a character bound, and the
# bound grows until the cut holds CUT_MARGIN_TOKENS tokens past the last token kept (or is the whole
# text). A cut changes how the last few tokens before it merge, never tokens this far back, so the kept
# tokens are the whole text's (tests/test_prompt.py checks cuts against whole texts). The first bound
# assumes FIRST_CHARS_PER_TOKEN characters a token, above what most text averages.
CUT_MARGIN_TOKENS = 64
FIRST_CHARS_PER_TOKEN = 6

# The model card's shared example, used by the demos.
CARD_QUERY = "What is the boiling point of water at sea level?"
CARD_DOCUMENTS = [
    "Water boils at 100 C (212 F) at standard atmospheric pressure (1 atm), "
    "which corresponds to sea-level conditions.",
    "Mount Everest is the highest mountain on Earth, with a peak elevation "
    "of 8,848 meters above sea level.",
]


def build_prompt(query: str, doc: str) -> str:
    """The full prompt string, exactly as the model card's `build_prompt`."""
    return PROMPT_TEMPLATE.format(system=SYSTEM_PROMPT, instruction=INSTRUCTION, query=query, doc=doc)


# Pieces of the template: (kind, text). "special" pieces are single special tokens; "text" pieces are
# template text; "query"/"doc" are the user's.
_USER_TEXT_HEAD = "user\n<Instruct>: " + INSTRUCTION + "\n<Query>: "
_PREFIX_PIECES = (
    ("special", "<|im_start|>"), ("text", "system\n" + SYSTEM_PROMPT), ("special", "<|im_end|>"),
    ("text", "\n"), ("special", "<|im_start|>"),
)
_SUFFIX_PIECES = (
    ("special", "<|im_end|>"), ("text", "\n"), ("special", "<|im_start|>"), ("text", "assistant\n"),
    ("special", "<think>"), ("text", "\n\n"), ("special", "</think>"), ("text", "\n\n"),
)

# A chat template for sentence-transformers' CrossEncoder (path B): a (query, document) pair arrives
# as messages with roles "query" and "document"; it renders the exact Prism prompt.
CROSS_ENCODER_CHAT_TEMPLATE = (
    "{%- set q = (messages | selectattr('role', 'eq', 'query') | first).content -%}"
    "{%- set d = (messages | selectattr('role', 'eq', 'document') | first).content -%}"
    "{%- if q is not string %}{% set q = q[0].text %}{% endif -%}"
    "{%- if d is not string %}{% set d = d[0].text %}{% endif -%}"
    + "{{- " + json.dumps(PROMPT_TEMPLATE.split("{query}")[0].format(system=SYSTEM_PROMPT, instruction=INSTRUCTION), ensure_ascii=False)
    + " + q + " + json.dumps("\n<Document>: ", ensure_ascii=False) + " + d + "
    + json.dumps(PROMPT_TEMPLATE.split("{doc}")[1], ensure_ascii=False) + " -}}"
)


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (query, document) prompt, split for prefix reuse."""

    prefix: list[int]  # shared by every document of the query
    document: list[int]  # the document segment (leading space included), possibly truncated
    suffix: list[int]
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + len(self.document) + len(self.suffix)

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.document + self.suffix


def _starts(offsets) -> array:
    """Token starts in a document from the offsets of its segment (which begins with the template's space),
    as an array (8 bytes a token: a long document's cut has 100,000s)."""
    return array("q", [max(0, start - 1) for start, _ in offsets])


class PromptTooLong(ValueError):
    """The query alone leaves no room for a document under the token budget."""


class PrismPromptTokenizer:
    """Tokenizes Prism prompts from a Hugging Face tokenizer, treating user text as text.

    `hf_tokenizer` must be a fast tokenizer; user text is encoded by its BPE model alone, without
    added tokens, so that no string in user text can become a special (or any added) token.
    """

    def __init__(self, hf_tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        from tokenizers import Tokenizer

        self.hf = hf_tokenizer
        self.max_length = max_length
        # The same BPE model, normalizer and pre-tokenizer, and no added tokens: nothing in user text can
        # match a special (or any added) token. Built from the parts, not a JSON round trip (seconds).
        backend = hf_tokenizer.backend_tokenizer
        self._text = Tokenizer(backend.model)
        self._text.normalizer = backend.normalizer
        self._text.pre_tokenizer = backend.pre_tokenizer
        self._text.decoder = backend.decoder
        self.yes_id = self._single("yes")
        self.no_id = self._single("no")
        self.eos_ids = [hf_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.pad_id = self.eos_ids[1]
        self._prefix_head = self._encode_pieces(_PREFIX_PIECES)
        self.suffix = self._encode_pieces(_SUFFIX_PIECES)

    def _single(self, word: str) -> int:
        ids = self.encode_text(word)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits {word!r} into {len(ids)} tokens; not a Prism tokenizer")
        return ids[0]

    def encode_text(self, text: str) -> list[int]:
        """Plain-text tokens: special-token strings in `text` stay text."""
        return self._text.encode(text, add_special_tokens=False).ids

    def _encode_pieces(self, pieces) -> list[int]:
        ids: list[int] = []
        for kind, text in pieces:
            if kind == "special":
                tid = self.hf.convert_tokens_to_ids(text)
                if tid is None or tid == self.hf.unk_token_id:
                    raise ValueError(f"tokenizer lacks the special token {text!r}")
                ids.append(tid)
            else:
                ids.extend(self.encode_text(text))
        return ids

    def prefix(self, query: str) -> list[int]:
        """System + instruction + query: the part shared by all documents of a query."""
        return self._prefix_head + self.encode_text(_USER_TEXT_HEAD + query + "\n<Document>:")

    def document(self, doc: str, limit: int | None = None) -> list[int]:
        """The document segment's tokens; with `limit`, only its first `limit` (the rest is never tokenized)."""
        return self.documents([doc], limit)[0]

    def documents(self, docs: list[str], limit: int | None = None) -> list[list[int]]:
        """`document` of each, tokenized as one batch."""
        return [e.ids[:limit] for _, e in self._leading([" " + d for d in docs], limit)]

    def document_head(self, doc: str, need: int) -> str:
        """The shortest cut of `doc` (or `doc` itself) whose tokenization holds its first `need` tokens
        exactly as the whole text's, with CUT_MARGIN_TOKENS more tokens after them: what a tier needs to
        read of a long document."""
        return self.document_head_starts(doc, need)[0]

    def document_head_starts(self, doc: str, need: int) -> tuple[str, array]:
        """`document_head(doc, need)`, and `document_token_starts` of it, from one tokenization."""
        cut, enc = self._leading([" " + doc], need)[0]
        return doc[: cut - 1], _starts(enc.offsets)

    def document_token_starts(self, doc: str) -> array:
        """Where each token of `document(doc)` starts, as a character offset in `doc`."""
        return _starts(self._text.encode(" " + doc, add_special_tokens=False).offsets)

    def _leading(self, texts: list[str], need: int | None) -> list[tuple[int, object]]:
        """Per text: (characters tokenized, their encoding). A text is tokenized whole, or cut to a bound
        that grows until its first `need` tokens are settled (CUT_MARGIN_TOKENS tokens past them): each
        next bound is what the characters per token seen so far call for, with a fifth more, and at
        least 1.5 times the last."""
        if need is None:
            return [(len(t), e) for t, e in zip(texts, self._text.encode_batch(texts, add_special_tokens=False))]
        want = need + CUT_MARGIN_TOKENS
        out: list = [None] * len(texts)
        bounds = dict.fromkeys(range(len(texts)), want * FIRST_CHARS_PER_TOKEN)
        while bounds:
            order = list(bounds)
            cuts = [texts[i][:bounds[i]] for i in order]
            for i, cut, enc in zip(order, cuts, self._text.encode_batch(cuts, add_special_tokens=False)):
                if len(cut) == len(texts[i]) or len(enc.ids) >= want:
                    out[i] = (len(cut), enc)
                    del bounds[i]
                else:
                    bounds[i] = max(3 * len(cut) // 2, int(1.2 * len(cut) * want / max(1, len(enc.ids))))
        return out

    def document_room(self, prefix: list[int], max_doc_tokens: int | None = None, strict: bool = False) -> int:
        """Document tokens that fit `max_length` after `prefix` and the suffix (and `max_doc_tokens`): the one
        definition of a document's room. A query that leaves none raises PromptTooLong when `strict`, else
        gets a room of 1 (its scorer call then says why)."""
        room = self.max_length - len(prefix) - len(self.suffix)
        if room < 1 and strict:
            raise PromptTooLong(
                f"query is {len(prefix) - len(self._prefix_head)} tokens; with the prompt it leaves no room "
                f"for a document under max_length={self.max_length}"
            )
        return max(1, room if max_doc_tokens is None else min(room, max_doc_tokens))

    def encode(self, query: str, doc: str, prefix: list[int] | None = None,
               max_doc_tokens: int | None = None) -> EncodedPair:
        """Tokens of the whole prompt, with the document cut so the total fits `max_length`
        (and the document itself `max_doc_tokens`, when given)."""
        prefix = self.prefix(query) if prefix is None else prefix
        room = self.document_room(prefix, max_doc_tokens, strict=True)
        return self._pair(prefix, self.document(doc, room + 1), room)

    def encode_documents(self, query: str, docs: list[str], prefix: list[int] | None = None,
                         max_doc_tokens: int | None = None) -> list[EncodedPair]:
        """`encode` for each document of one query, the documents tokenized as one batch, which the
        tokenizers library spreads over the machine's cores: host time per request that a GPU would
        otherwise wait on (`benchmarks/bench_tokenize.py`)."""
        prefix = self.prefix(query) if prefix is None else prefix
        room = self.document_room(prefix, max_doc_tokens, strict=True)
        return [self._pair(prefix, ids, room) for ids in self.documents(docs, room + 1)]

    def _pair(self, prefix: list[int], doc_ids: list[int], room: int) -> EncodedPair:
        """`doc_ids`: the document's tokens, or its first room + 1 (enough to tell it was cut)."""
        truncated = len(doc_ids) > room
        return EncodedPair(prefix, doc_ids[:room] if truncated else doc_ids, self.suffix, truncated)
