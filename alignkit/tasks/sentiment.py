"""The ``sentiment`` task's gold judge: VADER compound score of the review the policy writes.

The task asks the policy, in one chat turn, to continue the opening of a movie
review (``Continue this movie review: "This movie was"``); openings are neutral to
slightly negative. The judge reads the reply alone. For a plain-text prompt (a
user task, or a base model continuing the opening itself) it reads the opening
plus the continuation as one text, so a completion that reverses a lukewarm
opening ("...tries hard, but in the end it is a delight") scores positive.
VADER (Hutto & Gilbert 2014) is a lexicon-and-rules scorer: offline, fast,
deterministic, and no reward model is trained on it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from alignkit.tasks import Prompt


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound score of ``text``, in [-1, 1] (0 for empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"])


def review_text(prompt: Prompt, completion: str) -> str:
    """What the judge reads: the reply to a chat prompt, or plain prompt + completion."""
    return prompt + completion if isinstance(prompt, str) else completion


def gold(prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
    """VADER compound score of each review, in [-1, 1]."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [vader_compound(review_text(p, c)) for p, c in zip(prompts, completions, strict=True)]
