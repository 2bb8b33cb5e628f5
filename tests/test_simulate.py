"""Simulated annotator panels: the agreement report separates careful from bad labelers."""

from __future__ import annotations

import numpy as np
import pytest

from alignkit.errors import InputError
from alignkit.feedback.agreement import agreement_report, validate_judgments
from alignkit.feedback.records import Item
from alignkit.feedback.simulate import make_panel, simulate_judgments

KIND_SIZES = {"pairwise": 2, "ranking": 4, "thumbs": 3, "likert": 3}


def make_items(kind: str, n: int, seed: int = 0) -> tuple[list[Item], dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    k = KIND_SIZES[kind]
    items = [
        Item(f"{kind}-{i}", f"prompt {i}", tuple(f"answer {k_} to {i}. " * 12 for k_ in range(k)))
        for i in range(n)
    ]
    gold = {item.prompt: rng.normal(0, 2, k).tolist() for item in items}
    return items, gold


def test_panel_shares_and_reproducibility():
    panel = make_panel(10, careless=0.2, adversarial=0.1, seed=3)
    kinds = [m.kind for m in panel]
    assert kinds.count("careless") == 2 and kinds.count("adversarial") == 1
    assert [m.name for m in panel] == [f"sim-{i:02d}" for i in range(10)]
    assert make_panel(10, careless=0.2, adversarial=0.1, seed=3) == panel
    with pytest.raises(InputError):
        make_panel(4, careless=0.6, adversarial=0.5)


@pytest.mark.parametrize("kind", ["pairwise", "ranking", "thumbs", "likert"])
def test_judgments_are_valid_records_with_overlap_and_seed(kind):
    items, gold = make_items(kind, 20)
    panel = make_panel(6, careless=0.5)
    judgments = simulate_judgments(items, lambda p, c: gold[p], panel, kind=kind, overlap=3, seed=9)
    assert len(judgments) == 60
    validate_judgments(items, judgments)
    for item in items:
        mine = [j for j in judgments if j.item_id == item.item_id]
        assert len({j.annotator for j in mine}) == 3
    for j in judgments:
        assert j.source == "simulated" and j.kind == kind and j.seconds > 0
        assert sorted(j.display_order) == list(range(KIND_SIZES[kind]))
        if kind == "ranking":
            assert sorted(i for g in j.ranking for i in g) == [0, 1, 2, 3]
        if kind == "likert":
            assert set(j.ratings.values()) <= {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0}
        if kind == "thumbs":
            assert set(j.ratings.values()) <= {0.0, 1.0}
    again = simulate_judgments(items, lambda p, c: gold[p], panel, kind=kind, overlap=3, seed=9)
    assert again == judgments
    other = simulate_judgments(items, lambda p, c: gold[p], panel, kind=kind, overlap=3, seed=10)
    assert other != judgments


def test_careful_annotators_follow_bradley_terry_probabilities():
    items = [Item(f"i{n}", "same", ("a", "b")) for n in range(4000)]
    panel = make_panel(1)
    judgments = simulate_judgments(
        items, lambda p, c: [0.5, 0.0], panel, overlap=1, temperature=0.5, seed=0
    )
    first_wins = np.mean([j.ranking[0] == (0,) for j in judgments])
    expected = 1 / (1 + np.exp(-1.0))  # sigmoid(0.5 / 0.5)
    assert abs(first_wins - expected) < 3 * np.sqrt(expected * (1 - expected) / 4000)
    adversarial = [m for m in make_panel(1, adversarial=1.0)]
    inverted = simulate_judgments(
        items, lambda p, c: [0.5, 0.0], adversarial, overlap=1, temperature=0.5
    )
    assert abs(np.mean([j.ranking[0] == (0,) for j in inverted]) - (1 - expected)) < 0.03


def test_plackett_luce_sampling_matches_its_top_choice_probabilities():
    items = [Item(f"i{n}", "same", ("a", "b", "c")) for n in range(6000)]
    gold = [1.0, 0.0, -1.0]
    judgments = simulate_judgments(
        items, lambda p, c: gold, make_panel(1), kind="ranking", overlap=1, seed=2
    )
    top = np.bincount([j.ranking[0][0] for j in judgments], minlength=3) / 6000
    expected = np.exp(gold) / np.exp(gold).sum()
    assert np.abs(top - expected).max() < 0.02


@pytest.mark.parametrize("kind", ["pairwise", "ranking", "thumbs", "likert"])
def test_report_ranks_careful_above_bad_and_flags_every_careless(kind):
    items, gold = make_items(kind, 80, seed=1)
    panel = make_panel(10, careless=0.2, adversarial=0.1, seed=1)
    judgments = simulate_judgments(
        items, lambda p, c: gold[p], panel, kind=kind, overlap=5, temperature=0.5, seed=1
    )
    report = agreement_report(items, judgments)
    kinds = {m.name: m.kind for m in panel}
    ranked = [kinds[q.annotator] for q in report.ranked()]
    assert ranked[:7] == ["careful"] * 7  # every careful one above every bad one
    for q in report.quality.values():
        if kinds[q.annotator] == "careless":
            assert q.too_fast and q.median_seconds < 3.0
        if kinds[q.annotator] == "adversarial":
            assert q.low_agreement and not q.too_fast
        if kinds[q.annotator] == "careful":
            assert not q.flagged
    assert report.flagged == {name for name, k in kinds.items() if k != "careful"}


@pytest.mark.parametrize("kind", ["pairwise", "ranking", "thumbs", "likert"])
def test_clean_panel_alpha_near_one_at_low_noise_and_near_zero_at_pure_noise(kind):
    items, gold = make_items(kind, 300, seed=2)
    panel = make_panel(8)
    alphas = {}
    for temperature in (0.01, 1e6):
        judgments = simulate_judgments(
            items,
            lambda p, c: gold[p],
            panel,
            kind=kind,
            overlap=3,
            temperature=temperature,
            seed=5,
        )
        report = agreement_report(items, judgments)
        (alphas[temperature],) = [v for k, v in report.alpha.items() if not k.endswith("interval")]
    assert alphas[0.01] > 0.95
    assert abs(alphas[1e6]) < 0.08


def test_bad_inputs():
    items, gold = make_items("ranking", 3)
    panel = make_panel(3)
    with pytest.raises(InputError, match="overlap"):
        simulate_judgments(items, lambda p, c: gold[p], panel, kind="ranking", overlap=4)
    with pytest.raises(InputError, match="pairwise"):
        simulate_judgments(items, lambda p, c: gold[p], panel, kind="pairwise")
    with pytest.raises(InputError, match="4 finite scores"):
        simulate_judgments(items, lambda p, c: [1.0], panel, kind="ranking")
