"""Judgments -> training data in TRL's formats.

* Preference rows ``{"prompt", "chosen", "rejected", "margin"}``: a ranking of K gives
  C(K, 2) pairs with margin = rank-group gap; a pairwise judgment gives one pair;
  likert scores give a pair per two completions whose scores differ by at least
  ``likert_min_gap`` (margin = score difference). Ties are dropped unless
  ``keep_ties`` (then margin 0); "both bad" judgments are always dropped.
* Unpaired (KTO) rows ``{"prompt", "completion", "label"}``: thumbs up/down, or
  likert >= ``good_at`` (True) / <= ``bad_at`` (False).

Across annotators, pairs are decided by majority vote (an even split is a tie),
or by strengths fitted per item: Bradley-Terry on all pairwise votes, or
Plackett-Luce on the rankings. Both fits are the MM algorithm (Hunter 2004) on
"choice events": completion c chosen from a set R with weight w, log-likelihood
``sum_e w_e (theta_c - log sum_{r in R} exp theta_r)``. A pairwise tie is half a win
each way; a tie group in a ranking shares one choice equally among its members.
A prior of ``prior`` virtual comparisons per pair, split evenly, keeps strengths
finite when a completion never wins or never loses.

A chat prompt (a list of messages) gives TRL's conversational form: completions
become ``[{"role": "assistant", "content": ...}]``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alignkit.errors import InputError
from alignkit.feedback.agreement import AgreementReport, latest_judgments, validate_judgments
from alignkit.feedback.records import Item, Judgment

Method = Literal["none", "majority", "bradley_terry", "plackett_luce"]
TIE = -1  # vote outcome code for a tie


# --- One judgment -> pairs / unpaired labels ---


def pairs_from_judgment(
    judgment: Judgment, keep_ties: bool = False, likert_min_gap: float = 1.0
) -> list[tuple[int, int, float]]:
    """(chosen, rejected, margin) pairs of one judgment; ties are (lower, higher index, 0.0)."""
    if judgment.both_bad or judgment.kind == "thumbs":
        return []
    pairs: list[tuple[int, int, float]] = []
    if judgment.kind in ("pairwise", "ranking"):
        pairs = [(w, lo, float(gap)) for w, lo, gap in judgment.preferred_pairs()]
        if keep_ties:
            for group in judgment.ranking or ():
                pairs += [(a, b, 0.0) for a, b in combinations(sorted(group), 2)]
        return pairs
    scores = sorted((judgment.ratings or {}).items())
    for (i, score_i), (j, score_j) in combinations(scores, 2):
        diff = float(score_i - score_j)
        if abs(diff) >= likert_min_gap and diff != 0:
            pairs.append((i, j, diff) if diff > 0 else (j, i, -diff))
        elif keep_ties:
            pairs.append((i, j, 0.0))
    return pairs


def unpaired_from_judgment(
    judgment: Judgment, good_at: float = 5.0, bad_at: float = 3.0
) -> list[tuple[int, bool]]:
    """(completion, desirable) labels: thumbs as given; likert >= good_at / <= bad_at."""
    if judgment.kind == "thumbs":
        return [(int(i), v >= 0.5) for i, v in sorted((judgment.ratings or {}).items())]
    if judgment.kind == "likert":
        labels = []
        for i, score in sorted((judgment.ratings or {}).items()):
            if score >= good_at:
                labels.append((int(i), True))
            elif score <= bad_at:
                labels.append((int(i), False))
        return labels
    return []


# --- Majority vote ---


@dataclass(frozen=True)
class PairDecision:
    """The panel's verdict on one pair of completions of an item."""

    item_id: str
    chosen: int  # for a tie: the lower index
    rejected: int
    margin: float  # mean margin of the winning votes; 0 for a tie
    tie: bool
    agreement: float  # share of votes for the winning outcome (a tie counts as an outcome)
    n_votes: int


def majority_vote(judgments: Sequence[Judgment], likert_min_gap: float = 1.0) -> list[PairDecision]:
    """Majority verdict per pair over one item's judgments (one vote per judgment and pair).

    Outcomes are "i wins", "j wins" and "tie"; the outcome with strictly most votes
    wins, an even split between the top outcomes is a tie.
    """
    votes: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    for j in judgments:
        for chosen, rejected, margin in pairs_from_judgment(j, True, likert_min_gap):
            key = (min(chosen, rejected), max(chosen, rejected))
            votes[key].append((TIE if margin == 0 else chosen, margin))
    decisions = []
    item_id = judgments[0].item_id if judgments else ""
    for (a, b), cast in sorted(votes.items()):
        tally = Counter(outcome for outcome, _ in cast).most_common()
        top = tally[0][1]
        leaders = [outcome for outcome, count in tally if count == top]
        outcome = leaders[0] if len(leaders) == 1 else TIE
        margins = [m for o, m in cast if o == outcome] if outcome != TIE else [0.0]
        decisions.append(
            PairDecision(
                item_id=item_id,
                chosen=a if outcome in (a, TIE) else b,
                rejected=b if outcome in (a, TIE) else a,
                margin=float(np.mean(margins)),
                tie=outcome == TIE,
                agreement=top / len(cast),
                n_votes=len(cast),
            )
        )
    return decisions


# --- Bradley-Terry and Plackett-Luce strengths ---


def fit_choice_model(
    n: int,
    events: Sequence[tuple[int, Sequence[int], float]],
    prior: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 20_000,
) -> np.ndarray:
    """Log-strengths theta (n,), mean zero, maximising the choice-event log-likelihood.

    ``events``: (chosen, candidate set, weight). MM update (Hunter 2004):
    ``gamma_i <- W_i / sum_{e: i in R_e} w_e / sum_{r in R_e} gamma_r`` with ``W_i`` the
    chosen weight of i. ``prior`` virtual comparisons per pair (split evenly) are added.
    """
    if prior <= 0:
        raise InputError("prior must be > 0 (it keeps the strengths finite)", field="prior")
    if n < 2:
        return np.zeros(n)
    all_events = list(events) + [
        (c, (i, j), prior / 2.0) for i, j in combinations(range(n), 2) for c in (i, j)
    ]
    membership = np.zeros((len(all_events), n))  # (E, n) 1 where a completion is a candidate
    weights = np.zeros(len(all_events))
    wins = np.zeros(n)
    for e, (chosen, candidates, weight) in enumerate(all_events):
        if chosen not in candidates:
            raise InputError(f"choice event: {chosen} is not among {tuple(candidates)}")
        membership[e, list(candidates)] = 1.0
        weights[e] = weight
        wins[chosen] += weight
    gamma = np.ones(n)
    for _ in range(max_iter):
        denominators = membership @ gamma  # (E,)
        updated = wins / (membership.T @ (weights / denominators))
        updated /= np.exp(np.log(updated).mean())
        change = np.abs(np.log(updated) - np.log(gamma)).max()
        gamma = updated
        if change < tol:
            break
    return np.log(gamma)


def bradley_terry(wins: np.ndarray, prior: float = 1.0) -> np.ndarray:
    """Log-strengths from a (K, K) matrix, ``wins[i, j]`` = times i beat j (a tie: 0.5 each)."""
    wins = np.asarray(wins, dtype=float)
    if wins.ndim != 2 or wins.shape[0] != wins.shape[1] or (wins < 0).any():
        raise InputError("wins must be a square non-negative matrix")
    events = [
        (i, (i, j), float(wins[i, j]))
        for i in range(wins.shape[0])
        for j in range(wins.shape[0])
        if i != j and wins[i, j] > 0
    ]
    return fit_choice_model(wins.shape[0], events, prior)


def plackett_luce(
    n: int, rankings: Iterable[Sequence[Sequence[int]]], prior: float = 1.0
) -> np.ndarray:
    """Log-strengths from rankings given as tie groups, best first.

    Stage g picks group ``G_g`` from the completions not yet placed; each member is
    chosen with weight ``1/|G_g|``. The last stage (one candidate left) carries no
    information and is skipped.
    """
    events = []
    for ranking in rankings:
        remaining = [i for group in ranking for i in group]
        for group in ranking:
            if len(remaining) >= 2:
                events += [(i, tuple(remaining), 1.0 / len(group)) for i in group]
            remaining = [i for i in remaining if i not in group]
    return fit_choice_model(n, events, prior)


def _likert_ranking(j: Judgment) -> tuple[tuple[int, ...], ...]:
    by_score: dict[float, list[int]] = defaultdict(list)
    for i, score in (j.ratings or {}).items():
        by_score[score].append(int(i))
    return tuple(tuple(sorted(by_score[s])) for s in sorted(by_score, reverse=True))


# --- Items and judgments -> TRL rows ---


def _completion(item: Item, index: int) -> Any:
    text = item.completions[index]
    return [{"role": "assistant", "content": text}] if isinstance(item.prompt, list) else text


def _pair_row(item: Item, chosen: int, rejected: int, margin: float) -> dict[str, Any]:
    return {
        "prompt": item.prompt,
        "chosen": _completion(item, chosen),
        "rejected": _completion(item, rejected),
        "margin": float(margin),
    }


def _usable(
    items: Iterable[Item], judgments: Iterable[Judgment], exclude: Collection[str]
) -> tuple[dict[str, Item], dict[str, list[Judgment]]]:
    judgments = list(judgments)
    by_id = validate_judgments(items, judgments)
    grouped: dict[str, list[Judgment]] = defaultdict(list)
    for j in latest_judgments(judgments):
        if j.annotator not in exclude:
            grouped[j.item_id].append(j)
    return by_id, grouped


def aggregate_pairs(
    items: Iterable[Item],
    judgments: Iterable[Judgment],
    method: Method = "majority",
    keep_ties: bool = False,
    min_agreement: float = 0.0,
    min_annotators: int = 1,
    exclude: Collection[str] = (),
    likert_min_gap: float = 1.0,
    prior: float = 1.0,
    min_strength_gap: float = 1e-6,
) -> list[dict[str, Any]]:
    """Preference rows ``{"prompt", "chosen", "rejected", "margin"}`` from pairwise,
    ranking and likert judgments (thumbs are ignored: see :func:`aggregate_unpaired`).

    ``method``: ``none`` (every judgment's pairs, one row each), ``majority``,
    ``bradley_terry`` or ``plackett_luce`` (per item; margin = log-strength gap,
    a gap below ``min_strength_gap`` is a tie). Items voted on by fewer than
    ``min_annotators`` annotators, or whose mean majority share over its pairs is
    below ``min_agreement``, are dropped; judgments by ``exclude`` are ignored; the
    latest judgment per (item, annotator, kind) counts.
    """
    if method not in ("none", "majority", "bradley_terry", "plackett_luce"):
        raise InputError(f"unknown aggregation method {method!r}", field="method")
    by_id, grouped = _usable(items, judgments, exclude)
    rows = []
    for item_id, item in by_id.items():
        voting = [j for j in grouped.get(item_id, []) if j.kind != "thumbs" and not j.both_bad]
        decisions = majority_vote(voting, likert_min_gap)
        if not decisions or len({j.annotator for j in voting}) < min_annotators:
            continue
        if np.mean([d.agreement for d in decisions]) < min_agreement:
            continue
        if method == "none":
            for j in voting:
                rows += [
                    _pair_row(item, c, r, m)
                    for c, r, m in pairs_from_judgment(j, keep_ties, likert_min_gap)
                ]
            continue
        if method == "majority":
            rows += [
                _pair_row(item, d.chosen, d.rejected, d.margin)
                for d in decisions
                if keep_ties or not d.tie
            ]
            continue
        k = len(item.completions)
        if method == "bradley_terry":
            wins = np.zeros((k, k))
            for j in voting:
                for c, r, m in pairs_from_judgment(j, True, likert_min_gap):
                    if m == 0:
                        wins[c, r] += 0.5
                        wins[r, c] += 0.5
                    else:
                        wins[c, r] += 1.0
            theta = bradley_terry(wins, prior)
        else:
            rankings = [_likert_ranking(j) if j.kind == "likert" else j.ranking for j in voting]
            theta = plackett_luce(k, rankings, prior)
        for d in decisions:  # every pair somebody voted on
            a, b = sorted((d.chosen, d.rejected))
            gap = float(theta[a] - theta[b])
            if abs(gap) >= min_strength_gap:
                rows.append(_pair_row(item, a, b, gap) if gap > 0 else _pair_row(item, b, a, -gap))
            elif keep_ties:
                rows.append(_pair_row(item, a, b, 0.0))
    return rows


def aggregate_unpaired(
    items: Iterable[Item],
    judgments: Iterable[Judgment],
    method: Literal["none", "majority"] = "majority",
    min_agreement: float = 0.0,
    min_annotators: int = 1,
    exclude: Collection[str] = (),
    good_at: float = 5.0,
    bad_at: float = 3.0,
) -> list[dict[str, Any]]:
    """KTO rows ``{"prompt", "completion", "label"}`` from thumbs and likert judgments.

    ``majority``: one row per completion labeled by a strict majority (an even split
    is dropped), if at least ``min_annotators`` labeled it and the majority share is
    at least ``min_agreement``. ``none``: one row per judgment and completion.
    """
    if method not in ("none", "majority"):
        raise InputError(f"unknown aggregation method {method!r}", field="method")
    by_id, grouped = _usable(items, judgments, exclude)
    rows = []
    for item_id, item in by_id.items():
        labels: dict[int, list[bool]] = defaultdict(list)
        for j in grouped.get(item_id, []):
            for index, label in unpaired_from_judgment(j, good_at, bad_at):
                labels[index].append(label)
        for index in sorted(labels):
            votes = labels[index]
            if method == "none":
                rows += [
                    {"prompt": item.prompt, "completion": _completion(item, index), "label": v}
                    for v in votes
                ]
                continue
            up = sum(votes)
            share = max(up, len(votes) - up) / len(votes)
            if 2 * up == len(votes) or len(votes) < min_annotators or share < min_agreement:
                continue
            rows.append(
                {
                    "prompt": item.prompt,
                    "completion": _completion(item, index),
                    "label": 2 * up > len(votes),
                }
            )
    return rows


def excluded_annotators(
    report: AgreementReport, min_agreement: float | None = None, drop_too_fast: bool = True
) -> set[str]:
    """Annotators to leave out: too fast (if ``drop_too_fast``) or below ``min_agreement``
    consensus agreement (the report's own ``low_agreement`` flag when None)."""
    out = set()
    for q in report.quality.values():
        if min_agreement is None:
            low = q.low_agreement
        else:
            low = not np.isnan(q.agreement) and q.agreement < min_agreement
        if low or (drop_too_fast and q.too_fast):
            out.add(q.annotator)
    return out


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as JSON lines through a temp file renamed into place; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return count
