"""Examples -> token ids: chat templates, prompt/completion boundaries, and the length policy.

Standard (string) prompts are tokenized as they are (with the tokenizer's own special
tokens, e.g. BOS) and the completion gets EOS appended. Conversational prompts are
rendered with the tokenizer's chat template plus the generation prompt; the
completion is whatever the template renders after that, up to and including the EOS
that closes the last completion message, so ``decode(prompt_ids + completion_ids)``
is exactly the chat rendering of the whole conversation up to that EOS.

A row longer than ``max_length`` (prompt + completion tokens) is either truncated,
the prompt first (its left end is cut down to ``max_prompt_length``), then the
completion (its right end), or dropped. The :class:`LengthReport` counts both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from transformers import PreTrainedTokenizerBase

from alignkit.data.examples import (
    Completion,
    Message,
    PreferenceExample,
    Prompt,
    SFTExample,
    UnpairedExample,
)
from alignkit.errors import InputError

OverlongPolicy = Literal["truncate", "drop"]
Example = TypeVar("Example", SFTExample, PreferenceExample, UnpairedExample)
Tokenized = TypeVar("Tokenized")


@dataclass
class TokenizedSFT:
    """Token ids of one SFT example; the loss is taken on ``completion_ids`` only."""

    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class TokenizedPair:
    """Token ids of one preference pair; both completions follow the same ``prompt_ids``."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None


@dataclass
class TokenizedUnpaired:
    """Token ids of one unpaired (KTO) example with its desirable/undesirable label."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass
class LengthReport:
    """How many rows went over ``max_length`` and what was done with them."""

    total: int
    truncated: int
    dropped: int
    max_length: int

    def describe(self) -> str:
        """One line for the run log, e.g. ``12 of 400 rows over max_length=256 were truncated``."""
        if self.truncated:
            return f"{self.truncated} of {self.total} rows over max_length={self.max_length} were truncated"
        if self.dropped:
            return f"{self.dropped} of {self.total} rows over max_length={self.max_length} were dropped"
        return f"all {self.total} rows fit max_length={self.max_length}"


# 1. encoding ------------------------------------------------------------------------------


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "has no chat template, which conversational data needs; use string prompts or another tokenizer",
            path=getattr(tokenizer, "name_or_path", None) or "tokenizer",
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: plain text as is, chat messages through the chat template."""
    if isinstance(prompt, str):
        return _ids(tokenizer, prompt, add_special_tokens=True)
    return _ids(
        tokenizer,
        _render_chat(tokenizer, prompt, add_generation_prompt=True),
        add_special_tokens=False,
    )


def _completion_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    prompt_text: str | None,
    completion: Completion,
) -> list[int]:
    """Completion ids after an already rendered prompt (``prompt_text`` is None for strings)."""
    eos_id = tokenizer.eos_token_id
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise TypeError("a string prompt needs a string completion")
        return _ids(tokenizer, completion, add_special_tokens=False) + [eos_id]
    if isinstance(completion, str):
        raise TypeError("a conversational prompt needs a list of assistant messages as completion")
    full_text = _render_chat(
        tokenizer, list(prompt) + list(completion), add_generation_prompt=False
    )
    if prompt_text is None or not full_text.startswith(prompt_text):
        raise InputError(
            "chat template does not render the prompt as a prefix of prompt + completion",
            path=getattr(tokenizer, "name_or_path", None) or "tokenizer",
        )
    completion_ids = _ids(tokenizer, full_text[len(prompt_text) :], add_special_tokens=False)
    if eos_id in completion_ids:
        # keep through the EOS closing the last message; drop what the template adds after it ("\n")
        last_eos = len(completion_ids) - 1 - completion_ids[::-1].index(eos_id)
        return completion_ids[: last_eos + 1]
    return completion_ids + [eos_id]


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str | None:
    if isinstance(prompt, str):
        return None
    return _render_chat(tokenizer, prompt, add_generation_prompt=True)


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completions: Sequence[Completion]
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (rendered once) and each completion's ids after it."""
    prompt_text = _prompt_text(tokenizer, prompt)
    if prompt_text is None:
        prompt_ids = encode_prompt(tokenizer, prompt)
    else:
        prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens=False)
    return prompt_ids, [
        _completion_ids(tokenizer, prompt, prompt_text, completion) for completion in completions
    ]


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: Completion
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``; the completion ends with EOS.

    Their concatenation decodes to the full rendering (chat template or plain text).
    """
    prompt_ids, (completion_ids,) = _encode(tokenizer, prompt, [completion])
    return prompt_ids, completion_ids


# 2. length policy -----------------------------------------------------------------------


def check_lengths(max_length: int, max_prompt_length: int | None, overlong: str) -> int:
    """Validate the length settings; returns the effective ``max_prompt_length`` (default half)."""
    if max_length < 2:
        raise InputError(f"must be at least 2, got {max_length}", path="config", field="max_length")
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 1 <= max_prompt_length < max_length:
        raise InputError(
            f"must be between 1 and max_length - 1 ({max_length - 1}), got {max_prompt_length}",
            path="config",
            field="max_prompt_length",
        )
    if overlong not in ("truncate", "drop", "error"):
        raise InputError(
            f"must be 'truncate', 'drop' or 'error', got {overlong!r}",
            path="config",
            field="overlong",
        )
    return max_prompt_length


def fit_length(
    prompt_ids: list[int], completions: Sequence[list[int]], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[list[int]], bool]:
    """Truncate so that the prompt plus each completion fits ``max_length``.

    Rows that fit are returned unchanged. Otherwise the prompt loses tokens from its
    left end down to ``max_prompt_length`` (when longer), then each completion loses
    tokens from its right end. Returns ``(prompt_ids, completions, was_truncated)``.
    """
    if len(prompt_ids) + max(len(ids) for ids in completions) <= max_length:
        return prompt_ids, list(completions), False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    return prompt_ids, [ids[:budget] for ids in completions], True


def _tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    completions_of: Callable[[Example], list[Completion]],
    build: Callable[[Example, list[int], list[list[int]]], Tokenized],
    max_length: int,
    max_prompt_length: int | None,
    overlong: str,
) -> tuple[list[Tokenized], LengthReport]:
    """Encode each example, apply the length policy, and count what it changed."""
    max_prompt_length = check_lengths(max_length, max_prompt_length, overlong)
    tokenized, truncated, dropped = [], 0, 0
    for example in examples:
        prompt_ids, completion_ids = _encode(tokenizer, example.prompt, completions_of(example))
        length = len(prompt_ids) + max(len(ids) for ids in completion_ids)
        if length > max_length:
            if overlong == "error":
                raise InputError(
                    f"row has {length} tokens, over max_length={max_length} "
                    "(overlong=truncate or drop to accept it)",
                    path=example.source,
                    line=example.line,
                )
            if overlong == "drop":
                dropped += 1
                continue
            prompt_ids, completion_ids, _ = fit_length(
                prompt_ids, completion_ids, max_length, max_prompt_length
            )
            truncated += 1
        tokenized.append(build(example, prompt_ids, completion_ids))
    return tokenized, LengthReport(len(examples), truncated, dropped, max_length)


# 3. whole data sets -------------------------------------------------------------------------


def tokenize_sft(
    examples: Sequence[SFTExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: OverlongPolicy = "truncate",
) -> tuple[list[TokenizedSFT], LengthReport]:
    """Tokenize SFT examples and apply the length policy (``max_prompt_length`` defaults to half)."""
    return _tokenize(
        examples,
        tokenizer,
        lambda example: [example.completion],
        lambda example, prompt_ids, ids: TokenizedSFT(prompt_ids, ids[0]),
        max_length,
        max_prompt_length,
        overlong,
    )


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: OverlongPolicy = "truncate",
) -> tuple[list[TokenizedPair], LengthReport]:
    """Tokenize preference pairs; the prompt is tokenized once, so both sides share its ids.

    A pair is over ``max_length`` when the prompt plus its longer completion is; truncation
    cuts the shared prompt once and each completion to the same budget.
    """
    return _tokenize(
        examples,
        tokenizer,
        lambda example: [example.chosen, example.rejected],
        lambda example, prompt_ids, ids: TokenizedPair(prompt_ids, ids[0], ids[1], example.margin),
        max_length,
        max_prompt_length,
        overlong,
    )


def tokenize_unpaired(
    examples: Sequence[UnpairedExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: OverlongPolicy = "truncate",
) -> tuple[list[TokenizedUnpaired], LengthReport]:
    """Tokenize unpaired (KTO) examples and apply the length policy."""
    return _tokenize(
        examples,
        tokenizer,
        lambda example: [example.completion],
        lambda example, prompt_ids, ids: TokenizedUnpaired(prompt_ids, ids[0], example.label),
        max_length,
        max_prompt_length,
        overlong,
    )
