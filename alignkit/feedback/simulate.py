"""Simulated annotators: a panel of virtual labelers judging items by a gold score.

A careful annotator perceives completion i with utility ``g_i`` and compares two
completions with Bradley-Terry noise, ``P(i beats j) = sigmoid((g_i - g_j) / T)``.
Rankings are drawn by sequential Plackett-Luce sampling with weights ``exp(g_i / T)``
(Gumbel-max: sort ``g_i / T + Gumbel`` descending), which reduces to the pairwise rule
for K = 2. Absolute judgments use a noisy utility ``u_i = g_i + T * Logistic`` cut at
quantiles of the gold scores over all items: the median for thumbs, the 1/7..6/7
quantiles for the 1..7 likert scale.

* ``careful``: as above, reading time grows with the text length;
* ``careless``: uniformly random choices, a few seconds per item;
* ``adversarial``: the careful rule on ``-g`` (inverted preferences), careful speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from alignkit.errors import InputError
from alignkit.feedback.records import Item, Judgment, TaskKind

AnnotatorKind = Literal["careful", "careless", "adversarial"]
GoldFn = Callable[[Any, Sequence[str]], Sequence[float]]

LIKERT_POINTS = 7
START_TIME = 1_700_000_000.0  # created_at of the first simulated judgment (unix time)


@dataclass(frozen=True)
class SimulatedAnnotator:
    """One virtual labeler; the name does not reveal the kind."""

    name: str
    kind: AnnotatorKind


def make_panel(
    n: int, careless: float = 0.0, adversarial: float = 0.0, seed: int = 0
) -> list[SimulatedAnnotator]:
    """A panel of ``n`` annotators with the given shares of careless and adversarial ones.

    Counts are ``round(n * share)``; kinds are shuffled over the names ``sim-00`` ...
    with ``seed``.
    """
    n_careless = round(n * careless)
    n_adversarial = min(round(n * adversarial), n - n_careless)
    if n < 1 or min(careless, adversarial) < 0 or careless + adversarial > 1:
        raise InputError(
            f"cannot build a panel of {n} with shares {careless} careless, {adversarial} adversarial"
        )
    kinds: list[AnnotatorKind] = (
        ["careless"] * n_careless
        + ["adversarial"] * n_adversarial
        + ["careful"] * (n - n_careless - n_adversarial)
    )
    order = np.random.default_rng(seed).permutation(n)
    return [SimulatedAnnotator(f"sim-{i:02d}", kinds[order[i]]) for i in range(n)]


def _sigmoid(x: float) -> float:
    return float(0.5 * (1.0 + np.tanh(0.5 * x)))  # stable for any x


def _seconds(kind: AnnotatorKind, n_chars: int, rng: np.random.Generator) -> float:
    """Plausible time on an item: careful ~ 5 s + reading at 25 chars/s; careless ~ 1.5 s."""
    median = 1.5 if kind == "careless" else 5.0 + n_chars / 25.0
    return float(round(median * np.exp(0.4 * rng.standard_normal()), 2))


def _utilities(kind: AnnotatorKind, gold: np.ndarray) -> np.ndarray:
    return -gold if kind == "adversarial" else gold


def _ranking(
    kind: AnnotatorKind, gold: np.ndarray, temperature: float, rng: np.random.Generator
) -> tuple[tuple[int, ...], ...]:
    """Best-first ranking by sequential Plackett-Luce sampling (Gumbel-max)."""
    if kind == "careless":
        order = rng.permutation(gold.size)
    elif temperature == 0:
        order = np.argsort(-_utilities(kind, gold), kind="stable")
    else:
        order = np.argsort(-(_utilities(kind, gold) / temperature + rng.gumbel(size=gold.size)))
    return tuple((int(i),) for i in order)


def _pairwise(
    kind: AnnotatorKind, gold: np.ndarray, temperature: float, rng: np.random.Generator
) -> tuple[tuple[int, ...], ...]:
    """[[winner], [loser]] with P(0 beats 1) = sigmoid((u_0 - u_1) / T)."""
    if kind == "careless":
        first_wins = rng.random() < 0.5
    else:
        diff = _utilities(kind, gold)[0] - _utilities(kind, gold)[1]
        p_first = (
            (0.5 if diff == 0 else float(diff > 0))
            if temperature == 0
            else _sigmoid(diff / temperature)
        )
        first_wins = rng.random() < p_first
    return ((0,), (1,)) if first_wins else ((1,), (0,))


def _absolute(
    kind: AnnotatorKind,
    gold: np.ndarray,
    temperature: float,
    cuts: np.ndarray,
    rng: np.random.Generator,
) -> dict[int, float]:
    """Ratings 0..len(cuts) (+1 for likert is done by the caller) from the noisy utility."""
    if kind == "careless":
        levels = rng.integers(0, cuts.size + 1, size=gold.size)
    else:
        noisy = gold + temperature * rng.logistic(size=gold.size)
        levels = np.searchsorted(cuts, noisy, side="right")
        if kind == "adversarial":
            levels = cuts.size - levels
    return {i: float(level) for i, level in enumerate(levels)}


def simulate_judgments(
    items: Sequence[Item],
    gold: GoldFn,
    panel: Sequence[SimulatedAnnotator],
    kind: TaskKind = "pairwise",
    overlap: int = 3,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[Judgment]:
    """``overlap`` distinct panel members judge each item; returns their :class:`Judgment` records.

    ``gold(prompt, completions)`` gives one score per completion. ``temperature`` is
    the Bradley-Terry noise scale in gold units (0 = noiseless, large = pure noise).
    Annotators per item are drawn at random without replacement; each judgment has a
    random ``display_order``, plausible ``seconds`` and ``source="simulated"``. The
    same ``seed`` gives the same judgments.
    """
    if not 1 <= overlap <= len(panel):
        raise InputError(
            f"overlap must be between 1 and the panel size {len(panel)}", field="overlap"
        )
    if temperature < 0:
        raise InputError("temperature must be >= 0", field="temperature")
    if kind not in ("pairwise", "ranking", "thumbs", "likert"):
        raise InputError(f"unknown task kind {kind!r}", field="kind")
    rng = np.random.default_rng(seed)
    scores = []
    for item in items:
        values = np.asarray(gold(item.prompt, item.completions), dtype=float)
        if values.shape != (len(item.completions),) or not np.isfinite(values).all():
            raise InputError(
                f"gold must return {len(item.completions)} finite scores", path=item.item_id
            )
        if kind == "pairwise" and values.size != 2:
            raise InputError("pairwise judging needs 2 completions per item", path=item.item_id)
        scores.append(values)
    everything = np.concatenate(scores) if scores else np.zeros(1)
    n_levels = 2 if kind == "thumbs" else LIKERT_POINTS
    cuts = np.quantile(everything, np.arange(1, n_levels) / n_levels)

    clock = {member.name: START_TIME for member in panel}
    judgments = []
    for item, values in zip(items, scores, strict=True):
        n_chars = sum(len(c) for c in item.completions)
        for index in rng.choice(len(panel), size=overlap, replace=False):
            member = panel[int(index)]
            display = tuple(int(i) for i in rng.permutation(values.size))
            ranking, ratings = None, None
            if kind == "pairwise":
                ranking = _pairwise(member.kind, values, temperature, rng)
            elif kind == "ranking":
                ranking = _ranking(member.kind, values, temperature, rng)
            else:
                levels = _absolute(member.kind, values, temperature, cuts, rng)
                ratings = levels if kind == "thumbs" else {i: v + 1.0 for i, v in levels.items()}
            seconds = _seconds(member.kind, n_chars, rng)
            clock[member.name] += seconds
            judgments.append(
                Judgment(
                    item_id=item.item_id,
                    annotator=member.name,
                    kind=kind,
                    ranking=ranking,
                    ratings=ratings,
                    seconds=seconds,
                    display_order=display,
                    source="simulated",
                    created_at=clock[member.name],
                )
            )
    return judgments
