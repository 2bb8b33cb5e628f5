"""Splitting JSONL text into its rows, light enough for the feedback app to import."""

from __future__ import annotations


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text, split on "\\n" only.

    ``str.splitlines()`` also splits on U+2028, U+0085 and other separators, which
    ``json.dumps(..., ensure_ascii=False)`` leaves raw inside strings: sampled text
    holds them now and then, and a row split there is two halves of invalid JSON.
    A "\\r" left by CRLF files is JSON whitespace, so ``json.loads`` ignores it.
    """
    return text.split("\n")
