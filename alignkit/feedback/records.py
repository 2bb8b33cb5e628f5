"""Plain records that every part of the feedback system speaks.

An *item* is one prompt with K completions to be judged. A *judgment* is one
annotator's verdict on one item, whatever the task type:

* pairwise (K = 2): ``ranking=[[winner], [loser]]``; a tie is ``[[0, 1]]``;
  "both bad" is a tie with ``both_bad=True``;
* ranking (K >= 2): ``ranking`` lists tie groups best first, e.g. ``[[2], [0], [1]]``;
* thumbs: ``ratings={completion_index: 1.0 (up) or 0.0 (down)}``;
* likert: ``ratings={completion_index: 1..7}``.

Completion indices always refer to ``Item.completions`` as stored, never to the
order the annotator saw them in (that is ``display_order``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["pairwise", "ranking", "thumbs", "likert"]
Source = Literal["human", "ai", "simulated"]


@dataclass(frozen=True)
class Item:
    item_id: str
    prompt: Any  # str, or a list of chat messages
    completions: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgment:
    item_id: str
    annotator: str
    kind: TaskKind
    ranking: tuple[tuple[int, ...], ...] | None = None  # tie groups, best first
    ratings: dict[int, float] | None = None  # thumbs (0/1) or likert (1..7)
    both_bad: bool = False
    seconds: float = 0.0  # time the annotator spent on the item
    display_order: tuple[int, ...] = ()  # completion indices in the order shown
    guideline_version: int = 1
    source: Source = "human"
    created_at: float = 0.0  # unix time
    probability: float | None = None  # AI judge: P(the recorded order is right); None otherwise

    def preferred_pairs(self) -> list[tuple[int, int, int]]:
        """(winner, loser, rank_gap) for every strictly ordered pair of completions."""
        if self.ranking is None:
            return []
        pairs = []
        for upper, better_group in enumerate(self.ranking):
            for lower in range(upper + 1, len(self.ranking)):
                for winner in better_group:
                    for loser in self.ranking[lower]:
                        pairs.append((winner, loser, lower - upper))
        return pairs
