"""Toy rewards for the best-of-n / rejection-sampling / online-DPO / dm tests, loaded as
``reward=tests.length_rewards:NAME``.

The tiny random model samples almost uniformly from 49k tokens, and tokens differ in how
many characters they decode to, so the length of the completion's text varies from sample
to sample: a dense signal that selection (best-of-n, RSFT) and training can move.
"""

from __future__ import annotations

from collections.abc import Sequence


def long_text(prompts: Sequence[object], completions: Sequence[str]) -> list[float]:
    """Characters in the completion / 40."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [len(completion) / 40.0 for completion in completions]


def constant(prompts: Sequence[object], completions: Sequence[str]) -> list[float]:
    """Every completion scores 1, so all samples of a prompt tie."""
    return [1.0 for _ in completions]
