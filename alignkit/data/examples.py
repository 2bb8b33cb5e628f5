"""The normalised example types every loader returns, whatever the input format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
"""One chat turn: ``{"role": "user", "content": "..."}``."""

Prompt = str | list[Message]
"""A plain string (TRL "standard") or a list of chat messages (TRL "conversational")."""

Completion = str | list[Message]
"""A plain string, or in conversational form the assistant message(s) that answer the prompt."""


@dataclass
class Row:
    """One raw record as read from a source, with where it came from."""

    record: dict[str, Any]
    source: str
    line: int
    """1-based line in a JSONL file; 1-based row number for every other source."""


@dataclass
class SFTExample:
    """A prompt and the completion to imitate."""

    prompt: Prompt
    completion: Completion
    source: str = "<memory>"
    line: int = 0


@dataclass
class PreferenceExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion."""

    prompt: Prompt
    chosen: Completion
    rejected: Completion
    margin: float | None = None
    """How much better ``chosen`` is (rank gap, score gap, or a user column); None if unknown."""
    source: str = "<memory>"
    line: int = 0


@dataclass
class UnpairedExample:
    """A prompt and one completion labelled desirable (True) or undesirable (False), as KTO uses."""

    prompt: Prompt
    completion: Completion
    label: bool
    source: str = "<memory>"
    line: int = 0
