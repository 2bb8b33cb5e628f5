"""Evaluation statistics: every number worked by hand, Wilson checked against statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from alignkit.eval.stats import (
    WinRate,
    bootstrap_mean,
    count_outcomes,
    distinct_n,
    ngrams,
    outcomes,
    paired_bootstrap,
    wilson_interval,
    z_value,
)


def test_win_rate_with_ties_by_hand():
    # 6 wins, 2 ties, 2 losses: (6 + 0.5*2) / 10 = 0.7; without ties 6/8; tie rate 0.2
    counts = WinRate(wins=6, ties=2, losses=2)
    assert counts.n == 10
    assert counts.win_rate == pytest.approx(0.7)
    assert counts.win_rate_without_ties == pytest.approx(0.75)
    assert counts.tie_rate == pytest.approx(0.2)
    all_ties = WinRate(0, 4, 0)
    assert all_ties.win_rate == 0.5 and math.isnan(all_ties.win_rate_without_ties)
    assert math.isnan(WinRate(0, 0, 0).win_rate)


def test_outcomes_and_counts():
    coded = outcomes([0.9, 0.1, 0.5, 0.5, 0.52], [0.2, 0.3, 0.5, 0.7, 0.5])
    assert coded.tolist() == [1.0, 0.0, 0.5, 0.0, 1.0]
    # a tolerance of 0.05 turns the 0.02 gap into a tie
    assert outcomes([0.52], [0.5], tie_tolerance=0.05).tolist() == [0.5]
    counts = count_outcomes(coded)
    assert (counts.wins, counts.ties, counts.losses) == (2, 1, 2)
    with pytest.raises(ValueError):
        count_outcomes([0.3])
    with pytest.raises(ValueError):
        outcomes([1.0, 2.0], [1.0])


def test_wilson_by_hand():
    # p = 0.7, n = 10, z = 1.959964: z^2 = 3.841459
    # center = (0.7 + 0.1920729) / 1.3841459 = 0.644492
    # half = 1.959964 / 1.3841459 * sqrt(0.021 + 0.0096036) = 0.247715
    low, high = wilson_interval(7, 10)
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert low == pytest.approx(0.644492 - 0.247715, abs=1e-5)
    assert high == pytest.approx(0.644492 + 0.247715, abs=1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    "successes,n,confidence",
    [(0, 10, 0.95), (10, 10, 0.95), (7, 10, 0.95), (37, 80, 0.95), (1, 3, 0.9), (512, 1000, 0.99)],
)
def test_wilson_matches_statsmodels(successes, n, confidence):
    expected = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    assert wilson_interval(successes, n, confidence) == pytest.approx(expected, abs=1e-12)


def test_wilson_with_half_ties_uses_w_plus_half_t():
    counts = WinRate(wins=5, ties=3, losses=2)
    expected = proportion_confint(6.5, 10, alpha=0.05, method="wilson")
    assert counts.wilson() == pytest.approx(expected, abs=1e-12)


def test_bootstrap_mean_is_seeded_and_covers_the_mean():
    values = np.arange(20, dtype=float)
    first = bootstrap_mean(values, n_resamples=500, seed=3)
    again = bootstrap_mean(values, n_resamples=500, seed=3)
    other = bootstrap_mean(values, n_resamples=500, seed=4)
    assert first == again and first != other
    assert first.estimate == pytest.approx(9.5)
    assert first.low < 9.5 < first.high
    # the standard error of the mean is std/sqrt(n) = 5.77/4.47 = 1.29: a 95% interval is ~ +-2.5
    assert 1.8 < (first.high - first.low) / 2 < 3.2
    constant = bootstrap_mean([2.0, 2.0, 2.0])
    assert (constant.low, constant.estimate, constant.high) == (2.0, 2.0, 2.0)
    assert math.isnan(bootstrap_mean([]).estimate)


def test_cluster_bootstrap_resamples_whole_prompts():
    # two prompts, each with two identical samples: every resample's mean is 0, 0.5 or 1
    values = np.array([0.0, 0.0, 1.0, 1.0])
    clusters = np.array([0, 0, 1, 1])
    interval = bootstrap_mean(values, clusters, n_resamples=400, seed=0)
    assert interval.estimate == 0.5
    assert interval.low == 0.0 and interval.high == 1.0
    # unequal cluster sizes: the statistic is the mean over all drawn values
    values = np.array([1.0, 0.0, 0.0])
    interval = bootstrap_mean(values, np.array([7, 9, 9]), n_resamples=400, seed=0)
    assert interval.estimate == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        bootstrap_mean(values, np.array([0, 1]))


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 5, size=50)  # large, shared by both systems
    reference = prompt_effect + rng.normal(0, 0.1, size=50)
    policy = prompt_effect + 0.5 + rng.normal(0, 0.1, size=50)
    interval, p_not_better = paired_bootstrap(policy, reference, n_resamples=1000, seed=0)
    assert interval.estimate == pytest.approx(float(policy.mean() - reference.mean()))
    # pairing cancels the prompt effect: the interval is tight around 0.5 and excludes 0
    assert 0.4 < interval.low < interval.estimate < interval.high < 0.6
    assert p_not_better == 0.0
    same, p_same = paired_bootstrap(reference, reference, n_resamples=200, seed=0)
    assert (same.low, same.estimate, same.high) == (0.0, 0.0, 0.0) and p_same == 1.0


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the, cat, sat, the, cat, ran -> 4 unique of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["Same same", "same SAME"], 1) == pytest.approx(1 / 4)
    assert math.isnan(distinct_n(["one"], 2))
    assert ngrams("A b c", 2) == [("a", "b"), ("b", "c")]
    with pytest.raises(ValueError):
        distinct_n(texts, 0)
