"""Judgments -> TRL rows: counts, margins, majority vote, BT / PL fits, filters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from alignkit.errors import InputError
from alignkit.feedback.aggregate import (
    aggregate_pairs,
    aggregate_unpaired,
    bradley_terry,
    excluded_annotators,
    fit_choice_model,
    majority_vote,
    pairs_from_judgment,
    plackett_luce,
    unpaired_from_judgment,
    write_jsonl,
)
from alignkit.feedback.agreement import agreement_report
from alignkit.feedback.records import Item, Judgment
from alignkit.feedback.simulate import make_panel, simulate_judgments


def rank(*groups):
    return tuple(tuple(g) if isinstance(g, tuple) else (g,) for g in groups)


# --- One judgment ---


def test_ranking_of_four_gives_six_pairs_with_rank_gap_margins():
    judgment = Judgment("i", "a", "ranking", ranking=rank(2, 0, 3, 1))
    pairs = pairs_from_judgment(judgment)
    assert len(pairs) == 6
    assert sorted(pairs) == sorted(
        [(2, 0, 1.0), (2, 3, 2.0), (2, 1, 3.0), (0, 3, 1.0), (0, 1, 2.0), (3, 1, 1.0)]
    )


def test_ties_dropped_or_kept_and_both_bad_dropped():
    judgment = Judgment("i", "a", "ranking", ranking=rank((1, 3), 0, 2))
    assert len(pairs_from_judgment(judgment)) == 5  # C(4,2) minus the tie
    kept = pairs_from_judgment(judgment, keep_ties=True)
    assert (1, 3, 0.0) in kept and len(kept) == 6
    both_bad = Judgment("i", "a", "pairwise", ranking=rank((0, 1)), both_bad=True)
    assert pairs_from_judgment(both_bad, keep_ties=True) == []
    pairwise = Judgment("i", "a", "pairwise", ranking=rank(1, 0))
    assert pairs_from_judgment(pairwise) == [(1, 0, 1.0)]


def test_likert_pairs_by_score_difference_and_unpaired_by_threshold():
    judgment = Judgment("i", "a", "likert", ratings={0: 6.0, 1: 2.0, 2: 6.0, 3: 4.0})
    pairs = pairs_from_judgment(judgment, likert_min_gap=2.0)
    assert sorted(pairs) == sorted(
        [(0, 1, 4.0), (0, 3, 2.0), (2, 1, 4.0), (2, 3, 2.0), (3, 1, 2.0)]
    )
    assert (0, 2, 0.0) in pairs_from_judgment(judgment, keep_ties=True, likert_min_gap=2.0)
    assert unpaired_from_judgment(judgment, good_at=5, bad_at=3) == [
        (0, True),
        (1, False),
        (2, True),
    ]
    thumbs = Judgment("i", "a", "thumbs", ratings={0: 1.0, 1: 0.0})
    assert unpaired_from_judgment(thumbs) == [(0, True), (1, False)]
    assert pairs_from_judgment(thumbs) == []


# --- Majority vote ---


def test_majority_vote_on_a_constructed_disagreement():
    judgments = [
        Judgment("i", "a", "ranking", ranking=rank(0, 1, 2)),
        Judgment("i", "b", "ranking", ranking=rank(0, 2, 1)),
        Judgment("i", "c", "ranking", ranking=rank(1, 0, 2)),
    ]
    decisions = {(d.chosen, d.rejected): d for d in majority_vote(judgments)}
    # 0 vs 1: a, b say 0 (gaps 1, 2); c says 1 -> 0 wins 2/3, margin mean(1, 2).
    d01 = decisions[(0, 1)]
    assert not d01.tie and d01.agreement == pytest.approx(2 / 3) and d01.margin == 1.5
    # 0 vs 2: unanimous for 0 with gaps 2, 1, 1.
    assert decisions[(0, 2)].agreement == 1.0 and decisions[(0, 2)].margin == pytest.approx(4 / 3)
    # 1 vs 2: a, c say 1; b says 2.
    assert (1, 2) in decisions and decisions[(1, 2)].n_votes == 3
    split = majority_vote(
        [
            Judgment("j", "a", "pairwise", ranking=rank(0, 1)),
            Judgment("j", "b", "pairwise", ranking=rank(1, 0)),
        ]
    )
    assert len(split) == 1 and split[0].tie and split[0].margin == 0.0 and split[0].agreement == 0.5


def test_aggregate_pairs_majority_rows_and_ties_flag():
    items = [Item("i", "Say hi", ("hi", "yo")), Item("j", "Say bye", ("bye", "ciao"))]
    judgments = [
        Judgment("i", "a", "pairwise", ranking=rank(0, 1)),
        Judgment("i", "b", "pairwise", ranking=rank(0, 1)),
        Judgment("i", "c", "pairwise", ranking=rank(1, 0)),
        Judgment("j", "a", "pairwise", ranking=rank(0, 1)),
        Judgment("j", "b", "pairwise", ranking=rank(1, 0)),
    ]
    rows = aggregate_pairs(items, judgments)
    assert rows == [{"prompt": "Say hi", "chosen": "hi", "rejected": "yo", "margin": 1.0}]
    with_ties = aggregate_pairs(items, judgments, keep_ties=True)
    assert len(with_ties) == 2 and with_ties[1]["margin"] == 0.0
    every = aggregate_pairs(items, judgments, method="none")
    assert len(every) == 5
    with pytest.raises(InputError):
        aggregate_pairs(items, judgments, method="elo")


def test_chat_prompts_give_trl_conversational_rows():
    messages = [{"role": "user", "content": "Hello?"}]
    items = [Item("c", messages, ("Hi!", "Go away."))]
    rows = aggregate_pairs(items, [Judgment("c", "a", "pairwise", ranking=rank(0, 1))])
    assert rows[0]["prompt"] == messages
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Hi!"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "Go away."}]


# --- Bradley-Terry and Plackett-Luce ---


def test_bradley_terry_mm_reaches_the_penalised_maximum_likelihood():
    rng = np.random.default_rng(0)
    wins = rng.integers(0, 6, size=(4, 4)).astype(float)
    np.fill_diagonal(wins, 0)
    prior = 1.0
    theta = bradley_terry(wins, prior)

    def negative_log_likelihood(t):
        total = 0.0
        for i in range(4):
            for j in range(4):
                if i != j:
                    weight = wins[i, j] + prior / 2  # the prior: half a virtual win each way
                    total -= weight * (t[i] - np.logaddexp(t[i], t[j]))
        return total

    best = minimize(negative_log_likelihood, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    assert theta.mean() == pytest.approx(0.0, abs=1e-12)
    assert theta == pytest.approx(best.x - best.x.mean(), abs=1e-5)


def test_plackett_luce_mm_reaches_the_maximum_likelihood_and_equals_bt_for_pairs():
    rng = np.random.default_rng(1)
    rankings = [rank(*rng.permutation(4)) for _ in range(30)]
    theta = plackett_luce(4, rankings, prior=0.5)

    def negative_log_likelihood(t):
        total = 0.0
        for r in rankings:
            order = [g[0] for g in r]
            total -= sum(t[order[k]] - logsumexp(t[order[k:]]) for k in range(len(order) - 1))
        for i in range(4):
            for j in range(i + 1, 4):
                total -= 0.25 * (t[i] - np.logaddexp(t[i], t[j])) + 0.25 * (
                    t[j] - np.logaddexp(t[i], t[j])
                )
        return total

    best = minimize(negative_log_likelihood, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    assert theta == pytest.approx(best.x - best.x.mean(), abs=1e-5)
    # K = 2 rankings are Bradley-Terry comparisons.
    pairs = [rank(0, 1)] * 7 + [rank(1, 0)] * 3 + [rank((0, 1))] * 2
    wins = np.array([[0, 7 + 1], [3 + 1, 0]], dtype=float)  # a tie is half a win each way
    assert plackett_luce(2, pairs) == pytest.approx(bradley_terry(wins), abs=1e-8)
    with pytest.raises(InputError):
        fit_choice_model(2, [(0, (1,), 1.0)])


@pytest.mark.parametrize("method", ["bradley_terry", "plackett_luce", "majority"])
def test_fits_recover_a_known_ordering_from_simulated_comparisons(method):
    strengths = [2.0, -1.0, 0.5, -2.0, 1.0]  # true order: 0, 4, 2, 1, 3
    items = [Item("only", "prompt", tuple(f"c{k}" for k in range(5)))]
    panel = make_panel(40)
    kind = "ranking"
    judgments = simulate_judgments(
        items, lambda p, c: strengths, panel, kind=kind, overlap=40, temperature=1.0, seed=3
    )
    rows = aggregate_pairs(items, judgments, method=method)
    score = {f"c{k}": 0 for k in range(5)}
    for row in rows:
        score[row["chosen"]] += 1
    recovered = sorted(score, key=score.get, reverse=True)
    assert recovered == ["c0", "c4", "c2", "c1", "c3"]
    if method != "majority":
        margins = {(r["chosen"], r["rejected"]): r["margin"] for r in rows}
        assert margins[("c0", "c3")] > margins[("c0", "c4")] > 0


def test_bt_on_pairwise_panel_recovers_order_per_item():
    rng = np.random.default_rng(5)
    items = [Item(f"i{n}", f"prompt {n}", ("left", "right")) for n in range(30)]
    gold = {it.prompt: [float(g) for g in rng.normal(0, 2, 2)] for it in items}
    judgments = simulate_judgments(
        items, lambda p, c: gold[p], make_panel(9), overlap=9, temperature=0.3, seed=1
    )
    rows = aggregate_pairs(items, judgments, method="bradley_terry")
    by_prompt = {r["prompt"]: r for r in rows}
    correct = [
        (by_prompt[p]["chosen"] == "left") == (g[0] > g[1])
        for p, g in gold.items()
        if p in by_prompt and abs(g[0] - g[1]) > 1.0
    ]
    assert len(correct) >= 10 and all(correct)


# --- Filters ---


def test_filters_drop_the_right_rows():
    items = [Item(f"i{n}", f"p{n}", ("good", "bad")) for n in range(3)]
    judgments = [
        # i0: unanimous (3 annotators)
        *[Judgment("i0", name, "pairwise", ranking=rank(0, 1)) for name in ("a", "b", "c")],
        # i1: 2 vs 1
        Judgment("i1", "a", "pairwise", ranking=rank(0, 1)),
        Judgment("i1", "b", "pairwise", ranking=rank(0, 1)),
        Judgment("i1", "spam", "pairwise", ranking=rank(1, 0)),
        # i2: only the spammer
        Judgment("i2", "spam", "pairwise", ranking=rank(1, 0)),
    ]
    prompts = lambda rows: [r["prompt"] for r in rows]  # noqa: E731
    assert prompts(aggregate_pairs(items, judgments)) == ["p0", "p1", "p2"]
    assert prompts(aggregate_pairs(items, judgments, min_agreement=0.9)) == ["p0", "p2"]
    assert prompts(aggregate_pairs(items, judgments, min_annotators=2)) == ["p0", "p1"]
    assert prompts(aggregate_pairs(items, judgments, exclude={"spam"})) == ["p0", "p1"]
    unanimous_after_exclusion = aggregate_pairs(
        items, judgments, exclude={"spam"}, min_agreement=1.0
    )
    assert prompts(unanimous_after_exclusion) == ["p0", "p1"]


def test_excluded_annotators_from_a_simulated_report():
    rng = np.random.default_rng(2)
    items = [Item(f"i{n}", f"p{n}", ("x" * 300, "y" * 300)) for n in range(80)]
    gold = {it.prompt: rng.normal(0, 2, 2).tolist() for it in items}
    panel = make_panel(10, careless=0.2, adversarial=0.1, seed=4)
    judgments = simulate_judgments(
        items, lambda p, c: gold[p], panel, overlap=5, temperature=0.5, seed=4
    )
    report = agreement_report(items, judgments)
    bad = {m.name for m in panel if m.kind != "careful"}
    assert excluded_annotators(report) == bad
    fast_only = excluded_annotators(report, min_agreement=-1.0)
    assert fast_only == {m.name for m in panel if m.kind == "careless"}
    assert excluded_annotators(report, drop_too_fast=False) >= {
        m.name for m in panel if m.kind == "adversarial"
    }


def test_unpaired_rows_by_majority_and_filters():
    items = [Item("i", "p", ("a", "b", "c"))]
    judgments = [
        Judgment("i", "x", "thumbs", ratings={0: 1.0, 1: 0.0, 2: 1.0}),
        Judgment("i", "y", "thumbs", ratings={0: 1.0, 1: 0.0, 2: 0.0}),
        Judgment("i", "z", "likert", ratings={0: 7.0, 1: 1.0, 2: 4.0}),  # 4 is neutral: no label
    ]
    rows = aggregate_unpaired(items, judgments)
    assert rows == [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "p", "completion": "b", "label": False},
    ]  # c is split 1 vs 1 and dropped
    assert len(aggregate_unpaired(items, judgments, method="none")) == 8
    assert aggregate_unpaired(items, judgments, min_annotators=4) == []
    assert len(aggregate_unpaired(items, judgments, exclude={"z"})) == 2


def test_write_jsonl_round_trips(tmp_path):
    rows = [{"prompt": "p", "chosen": "é", "rejected": "b", "margin": 1.0}] * 3
    target = tmp_path / "out" / "pairs.jsonl"
    assert write_jsonl(rows, target) == 3
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert list(target.parent.iterdir()) == [target]  # no staging file left
