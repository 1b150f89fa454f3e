"""Parsing what a Prism model wrote: `yes`/`no`, then `<contribution>` and `<evidence>`.

Generation can stop anywhere (max_new_tokens, sampling, a weak checkpoint), so every part is
optional: a missing tag gives None, an unclosed tag gives the text up to the next tag or the end.
"""

from __future__ import annotations

from dataclasses import dataclass

_TAGS = ("contribution", "evidence")


@dataclass(frozen=True)
class ParsedOutput:
    verdict: str | None  # "yes", "no", or None when the text starts with neither
    contribution: str | None
    evidence: str | None


def parse_output(text: str) -> ParsedOutput:
    stripped = text.lstrip()
    head = stripped[:3].lower()
    verdict = "yes" if head == "yes" else "no" if head[:2] == "no" else None
    return ParsedOutput(verdict, _tag(text, "contribution"), _tag(text, "evidence"))


def _tag(text: str, tag: str) -> str | None:
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start)
    if end < 0:  # unclosed: stop at the next opening tag, if any
        others = [text.find(f"<{t}>", start) for t in _TAGS if t != tag]
        end = min([i for i in others if i >= 0], default=len(text))
    return text[start:end].strip()
