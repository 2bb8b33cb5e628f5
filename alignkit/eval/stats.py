"""Evaluation statistics: win rates with ties, Wilson and bootstrap intervals, distinct-n.

ALGORITHMS.md section 8. Conventions:

- An *outcome* is 1 (the policy's completion wins), 0.5 (tie) or 0 (loss) for one
  comparison with the reference; ``WR = (W + 0.5 T) / N``.
- The Wilson interval is exact for a binomial share; with half-credit ties it treats
  ``W + 0.5 T`` as the success count, which is only approximate. The bootstrap over
  prompts is the better interval then, and when a prompt has several samples (they are
  correlated, so N overstates the information).
- The bootstrap resamples *prompts* (clusters) with replacement, so every sample of a
  prompt stays together; two systems scored on the same prompts are resampled jointly
  (paired). Every bootstrap takes a seed and gives the same interval for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided confidence interval."""

    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class WinRate:
    """Counts of wins, ties and losses of a policy against a reference."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        """(W + 0.5 T) / N; NaN without comparisons."""
        return (self.wins + 0.5 * self.ties) / self.n if self.n else math.nan

    @property
    def win_rate_without_ties(self) -> float:
        """W / (W + L): ties left out; NaN when every comparison is a tie."""
        decided = self.wins + self.losses
        return self.wins / decided if decided else math.nan

    @property
    def tie_rate(self) -> float:
        """T / N; NaN without comparisons."""
        return self.ties / self.n if self.n else math.nan

    def wilson(self, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
        """Wilson interval of the win rate with ties, counting a tie as half a success."""
        return wilson_interval(self.wins + 0.5 * self.ties, self.n, confidence)


def z_value(confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The two-sided normal quantile: 1.959964 for 95%."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(
    successes: float, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval for the share p = successes / n.

    ``c = (p + z^2/2n) / (1 + z^2/n)``, ``h = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)``,
    interval ``(c - h, c + h)``; equals statsmodels ``proportion_confint(method="wilson")``.
    (NaN, NaN) when n = 0.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    z = z_value(confidence)
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def outcomes(
    policy_scores: Sequence[float] | np.ndarray,
    reference_scores: Sequence[float] | np.ndarray,
    tie_tolerance: float = 0.0,
) -> np.ndarray:
    """Per-comparison outcomes (N,): 1 where the policy scores higher, 0 lower, 0.5 when
    the two scores are within ``tie_tolerance`` of each other."""
    policy = np.asarray(policy_scores, dtype=float)
    reference = np.asarray(reference_scores, dtype=float)
    if policy.shape != reference.shape:
        raise ValueError(f"{policy.shape} policy scores for {reference.shape} reference scores")
    difference = policy - reference
    result = np.where(difference > 0, 1.0, 0.0)
    return np.where(np.abs(difference) <= tie_tolerance, 0.5, result)


def count_outcomes(values: Sequence[float] | np.ndarray) -> WinRate:
    """Wins, ties and losses among outcomes coded 1 / 0.5 / 0."""
    array = np.asarray(values, dtype=float)
    if not np.isin(array, (0.0, 0.5, 1.0)).all():
        raise ValueError("outcomes must be 0, 0.5 or 1")
    return WinRate(
        wins=int((array == 1.0).sum()),
        ties=int((array == 0.5).sum()),
        losses=int((array == 0.0).sum()),
    )


def _cluster_sums(values: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of values, count) per cluster (clusters in sorted label order)."""
    if clusters is None:
        return values.astype(float), np.ones(len(values))
    clusters = np.asarray(clusters)
    if clusters.shape != values.shape[:1]:
        raise ValueError(f"{clusters.shape} cluster labels for {values.shape[0]} values")
    labels_found, labels = np.unique(clusters, return_inverse=True)
    sums = np.zeros((len(labels_found),) + values.shape[1:])
    np.add.at(sums, labels, values)
    counts = np.bincount(labels, minlength=len(labels_found)).astype(float)
    return sums, counts


def _resample_indices(num_clusters: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, num_clusters) cluster indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_clusters, size=(n_resamples, num_clusters))


def _percentiles(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[int] | np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval.

    ``clusters`` (one label per value, e.g. the prompt index) makes it a cluster
    bootstrap: whole clusters are resampled, and the statistic is the mean over every
    value of the drawn clusters. Without it each value is its own cluster.
    """
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    sums, counts = _cluster_sums(array, None if clusters is None else np.asarray(clusters))
    draws_index = _resample_indices(len(sums), n_resamples, seed)
    draws = sums[draws_index].sum(1) / counts[draws_index].sum(1)
    low, high = _percentiles(draws, confidence)
    return Interval(float(array.mean()), low, high)


def paired_bootstrap(
    policy_values: Sequence[float] | np.ndarray,
    reference_values: Sequence[float] | np.ndarray,
    clusters: Sequence[int] | np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[Interval, float]:
    """Difference of means (policy - reference) on the same prompts, resampled jointly.

    Returns the interval of the difference and the share of resamples in which the
    difference is <= 0 (a one-sided bootstrap p-value for "the policy is better").
    """
    policy = np.asarray(policy_values, dtype=float)
    reference = np.asarray(reference_values, dtype=float)
    if policy.shape != reference.shape or policy.ndim != 1:
        raise ValueError(f"{policy.shape} policy values for {reference.shape} reference values")
    if policy.size == 0:
        return Interval(math.nan, math.nan, math.nan), math.nan
    stacked = np.stack([policy, reference], axis=1)  # (N, 2)
    sums, counts = _cluster_sums(stacked, None if clusters is None else np.asarray(clusters))
    draws_index = _resample_indices(len(sums), n_resamples, seed)
    means = sums[draws_index].sum(1) / counts[draws_index].sum(1)[:, None]  # (R, 2)
    differences = means[:, 0] - means[:, 1]
    low, high = _percentiles(differences, confidence)
    estimate = float(policy.mean() - reference.mean())
    return Interval(estimate, low, high), float((differences <= 0).mean())


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Word n-grams of ``text`` (lower-cased, split on whitespace)."""
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over ``texts``.

    1.0 means no n-gram repeats anywhere; a collapsed policy that says the same thing
    to every prompt approaches 0. NaN when the texts hold no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [gram for text in texts for gram in ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else math.nan
