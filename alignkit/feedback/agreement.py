"""Annotator agreement: chance-corrected statistics and a quality report per annotator.

Every statistic works on a *units x raters* table of floats with ``NaN`` where a
rater did not label a unit (the transpose of the ``krippendorff`` package's
input). :func:`unit_tables` turns judgments into such tables, one per family:

* ``pairwise``: one unit per item, value +1 (first completion better), -1
  (second better) or 0 (tie, including "both bad"); nominal;
* ``ranking``: one unit per pair (i, j), i < j, of an item's completions, value
  = rank-group position of j minus that of i (positive: i ranked better); ordinal;
* ``thumbs``: one unit per completion, value 0 or 1; nominal;
* ``likert``: one unit per completion, value 1..7; ordinal and interval.

Formulas are in ALGORITHMS.md section 9; all are written out here with numpy.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from alignkit.errors import InputError
from alignkit.feedback.records import Item, Judgment

Level = Literal["nominal", "ordinal", "interval", "ratio"]
Weights = Literal["linear", "quadratic"] | None

FAMILY_LEVEL: dict[str, Level] = {
    "pairwise": "nominal",
    "ranking": "ordinal",
    "thumbs": "nominal",
    "likert": "ordinal",
}


# --- Statistics on tables ---


def _as_table(table: Any, name: str = "table") -> np.ndarray:
    data = np.asarray(table, dtype=float)
    if data.ndim != 2:
        raise InputError(f"{name} must be 2-D (units x raters), got shape {data.shape}")
    return data


def _distance_matrix(values: np.ndarray, n_c: np.ndarray, level: Level) -> np.ndarray:
    """delta^2(c, k) for every pair of observed values (sorted ascending)."""
    if level == "nominal":
        return 1.0 - np.eye(values.size)
    if level == "interval":
        return np.subtract.outer(values, values) ** 2
    if level == "ratio":
        sums = np.add.outer(values, values)
        diffs = np.subtract.outer(values, values)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sums == 0, 0.0, (diffs / np.where(sums == 0, 1.0, sums)) ** 2)
    if level == "ordinal":
        index = np.arange(values.size)
        lo = np.minimum.outer(index, index)
        hi = np.maximum.outer(index, index)
        cumulative = np.cumsum(n_c)
        between = cumulative[hi] - cumulative[lo] + n_c[lo]  # sum of n_g for g = lo..hi
        return (between - (n_c[lo] + n_c[hi]) / 2.0) ** 2
    raise InputError(f"unknown level of measurement {level!r}", field="level")


def krippendorff_alpha(table: Any, level: Level = "nominal") -> float:
    """Krippendorff's alpha ``1 - D_o / D_e`` of a units x raters table (NaN = missing).

    Coincidences ``o_ck = sum_u #(c, k pairs from different raters in u) / (m_u - 1)``;
    units with fewer than two ratings are dropped. ``D_o = sum o_ck d2_ck / n`` and
    ``D_e = sum n_c n_k d2_ck / (n (n - 1))``. Returns NaN when there is no variation
    (``D_e = 0``) or no pairable unit.
    """
    data = _as_table(table)
    observed = ~np.isnan(data)
    values = np.unique(data[observed])
    if values.size == 0:
        return float("nan")
    counts = np.zeros((data.shape[0], values.size))  # (U, V) ratings of each value per unit
    rows, cols = np.nonzero(observed)
    np.add.at(counts, (rows, np.searchsorted(values, data[rows, cols])), 1.0)
    m_u = counts.sum(axis=1)
    counts, m_u = counts[m_u >= 2], m_u[m_u >= 2]
    if counts.shape[0] == 0:
        return float("nan")
    weighted = counts / (m_u - 1.0)[:, None]
    coincidence = weighted.T @ counts - np.diag(weighted.sum(axis=0))  # (V, V)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    delta2 = _distance_matrix(values, n_c, level)
    observed_disagreement = (coincidence * delta2).sum() / n
    expected_disagreement = (np.outer(n_c, n_c) * delta2).sum() / (n * (n - 1.0))
    if expected_disagreement == 0:
        return float("nan")
    return float(1.0 - observed_disagreement / expected_disagreement)


def _fleiss_from_counts(counts: np.ndarray) -> float:
    """Fleiss' kappa from an (N subjects, C categories) count table, n raters per subject."""
    n_subjects = counts.shape[0]
    n_raters = counts[0].sum()
    per_subject = ((counts**2).sum(axis=1) - n_raters) / (n_raters * (n_raters - 1.0))
    p_bar = per_subject.mean()
    p_j = counts.sum(axis=0) / (n_subjects * n_raters)
    p_e = (p_j**2).sum()
    if p_e == 1.0:
        return float("nan")
    return float((p_bar - p_e) / (1.0 - p_e))


def fleiss_kappa(table: Any) -> float:
    """Fleiss' kappa of a subjects x raters table of category labels, every cell filled.

    ``P_i = (sum_j n_ij^2 - n) / (n (n - 1))``, ``p_j = sum_i n_ij / (N n)``,
    ``kappa = (mean P_i - sum p_j^2) / (1 - sum p_j^2)``.
    """
    data = _as_table(table)
    if np.isnan(data).any():
        raise InputError("Fleiss' kappa needs every subject rated by every rater (no NaN)")
    if data.shape[1] < 2 or data.shape[0] == 0:
        raise InputError("Fleiss' kappa needs at least one subject and two raters")
    values, codes = np.unique(data, return_inverse=True)
    counts = np.zeros((data.shape[0], values.size))
    np.add.at(counts, (np.repeat(np.arange(data.shape[0]), data.shape[1]), codes.ravel()), 1.0)
    return _fleiss_from_counts(counts)


def cohen_kappa(
    first: Sequence[float],
    second: Sequence[float],
    weights: Weights = None,
    labels: Sequence[float] | None = None,
) -> float:
    """Cohen's kappa of two raters, ``1 - sum w O / sum w E`` with ``E = outer(marginals) / n``.

    Unweighted (``w = 1 - I``, equal to ``(p_o - p_e)/(1 - p_e)``), linear ``|i - j|`` or
    quadratic ``(i - j)^2``, where i, j are positions in the sorted ``labels`` (all
    observed values by default), as scikit-learn does. Positions where either rating
    is NaN are skipped. NaN when chance agreement is total.
    """
    a = np.asarray(first, dtype=float)
    b = np.asarray(second, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError("Cohen's kappa needs two 1-D rating sequences of equal length")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size == 0:
        return float("nan")
    categories = (
        np.unique(np.concatenate([a, b])) if labels is None else np.sort(np.asarray(labels, float))
    )
    ia, ib = np.searchsorted(categories, a), np.searchsorted(categories, b)
    if (ia >= categories.size).any() or (ib >= categories.size).any():
        raise InputError("a rating is not among the given labels", field="labels")
    if (categories[ia] != a).any() or (categories[ib] != b).any():
        raise InputError("a rating is not among the given labels", field="labels")
    k = categories.size
    confusion = np.zeros((k, k))
    np.add.at(confusion, (ia, ib), 1.0)
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / a.size
    distance = np.abs(np.subtract.outer(np.arange(k), np.arange(k))).astype(float)
    if weights is None:
        w = (distance > 0).astype(float)
    elif weights == "linear":
        w = distance
    elif weights == "quadratic":
        w = distance**2
    else:
        raise InputError(f"unknown kappa weights {weights!r}", field="weights")
    denominator = (w * expected).sum()
    if denominator == 0:
        return float("nan")
    return float(1.0 - (w * confusion).sum() / denominator)


def pairwise_kappa(table: Any, weights: Weights = None, min_overlap: int = 5) -> np.ndarray:
    """(R, R) Cohen's kappa of every pair of raters on the units both labeled.

    NaN where two raters share fewer than ``min_overlap`` units; 1 on the diagonal.
    Weighted kappas use the table's full sorted value set as the category order.
    """
    data = _as_table(table)
    labels = np.unique(data[~np.isnan(data)])
    n_raters = data.shape[1]
    matrix = np.full((n_raters, n_raters), np.nan)
    for r in range(n_raters):
        matrix[r, r] = 1.0
        for s in range(r + 1, n_raters):
            both = ~np.isnan(data[:, r]) & ~np.isnan(data[:, s])
            if both.sum() >= max(min_overlap, 1):
                value = cohen_kappa(data[both, r], data[both, s], weights, labels)
                matrix[r, s] = matrix[s, r] = value
    return matrix


def consensus_agreement(table: Any, level: Level = "nominal") -> tuple[np.ndarray, np.ndarray]:
    """Each rater's agreement with the leave-one-out consensus of the others.

    Nominal: consensus = the others' strict plurality value (units where the top
    count is shared are skipped); score 1 on a match, else 0. Ordinal / interval:
    consensus = median of the others; score ``1 - |x - median| / span`` with span the
    table's value range. Returns (mean score per rater, number of scored units per
    rater); the mean is NaN for a rater with no scored unit.
    """
    data = _as_table(table)
    observed = ~np.isnan(data)
    values = data[observed]
    span = float(values.max() - values.min()) if values.size else 0.0
    totals = np.zeros(data.shape[1])
    counts = np.zeros(data.shape[1])
    for unit in range(data.shape[0]):
        raters = np.nonzero(observed[unit])[0]
        if raters.size < 2:
            continue
        for r in raters:
            others = data[unit, raters[raters != r]]
            if level == "nominal":
                ranked = Counter(others.tolist()).most_common(2)
                if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
                    continue
                score = float(data[unit, r] == ranked[0][0])
            else:
                gap = abs(data[unit, r] - float(np.median(others)))
                score = 1.0 - gap / span if span > 0 else 1.0
            totals[r] += score
            counts[r] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
    return means, counts


def too_fast(
    seconds: Mapping[str, Sequence[float]], min_seconds: float = 3.0, panel_fraction: float = 0.25
) -> dict[str, bool]:
    """Flag annotators whose median seconds per item is below ``min_seconds`` or below
    ``panel_fraction`` x the panel median (median of the annotators' medians).

    Non-positive times mean "not recorded" and are ignored; an annotator with no
    recorded time is never flagged.
    """
    medians = {}
    for name, times in seconds.items():
        recorded = [t for t in times if t > 0]
        medians[name] = float(np.median(recorded)) if recorded else float("nan")
    known = [m for m in medians.values() if not np.isnan(m)]
    panel = float(np.median(known)) if known else float("nan")
    return {
        name: bool(not np.isnan(m) and (m < min_seconds or m < panel_fraction * panel))
        for name, m in medians.items()
    }


# --- Judgments -> unit tables ---


def validate_judgments(items: Iterable[Item], judgments: Iterable[Judgment]) -> dict[str, Item]:
    """Check every judgment against its item; return the items by id.

    Raises :class:`InputError` naming the annotator, item and field on an unknown
    item, an index out of range, a repeated index or a missing ranking/rating.
    """
    by_id = {item.item_id: item for item in items}
    for j in judgments:
        where = f"judgment by {j.annotator!r} on item {j.item_id!r}"
        item = by_id.get(j.item_id)
        if item is None:
            raise InputError(f"{where}: unknown item", field="item_id")
        k = len(item.completions)
        if j.kind in ("pairwise", "ranking"):
            if not j.ranking:
                raise InputError(f"{where}: a {j.kind} judgment needs a ranking", field="ranking")
            flat = [i for group in j.ranking for i in group]
            if len(set(flat)) != len(flat) or any(not 0 <= i < k for i in flat):
                raise InputError(
                    f"{where}: ranking {j.ranking} is not a set of indices < {k}", field="ranking"
                )
            if j.kind == "pairwise" and k != 2:
                raise InputError(
                    f"{where}: pairwise needs 2 completions, item has {k}", field="kind"
                )
        elif j.kind in ("thumbs", "likert"):
            if not j.ratings:
                raise InputError(f"{where}: a {j.kind} judgment needs ratings", field="ratings")
            for index, value in j.ratings.items():
                if not 0 <= int(index) < k or not np.isfinite(value):
                    raise InputError(f"{where}: bad rating {index}: {value}", field="ratings")
                if j.kind == "thumbs" and value not in (0.0, 1.0):
                    raise InputError(
                        f"{where}: thumbs must be 0 or 1, got {value}", field="ratings"
                    )
        else:
            raise InputError(f"{where}: unknown kind {j.kind!r}", field="kind")
    return by_id


def latest_judgments(judgments: Iterable[Judgment]) -> list[Judgment]:
    """One judgment per (item, annotator, kind): the latest by ``created_at``, then by position."""
    latest: dict[tuple[str, str, str], tuple[float, int, Judgment]] = {}
    for position, j in enumerate(judgments):
        key = (j.item_id, j.annotator, j.kind)
        if key not in latest or (j.created_at, position) >= latest[key][:2]:
            latest[key] = (j.created_at, position, j)
    return [entry[2] for entry in sorted(latest.values(), key=lambda e: e[1])]


def _unit_values(j: Judgment) -> list[tuple[tuple[Any, ...], float]]:
    """(unit key suffix, value) pairs one judgment contributes."""
    if j.kind in ("pairwise", "ranking"):
        position = {i: g for g, group in enumerate(j.ranking or ()) for i in group}
        ranked = sorted(position)
        out = []
        for a_pos, i in enumerate(ranked):
            for jdx in ranked[a_pos + 1 :]:
                gap = float(position[jdx] - position[i])
                out.append(((i, jdx), float(np.sign(gap)) if j.kind == "pairwise" else gap))
        return out
    return [((int(i),), float(v)) for i, v in sorted((j.ratings or {}).items())]


@dataclass
class UnitTable:
    """Units x annotators values of one judgment family (NaN = not labeled)."""

    family: str
    level: Level
    units: list[tuple[Any, ...]]  # (item_id, completion index...) per row
    annotators: list[str]  # column names
    values: np.ndarray  # (U, A)


def unit_tables(items: Iterable[Item], judgments: Iterable[Judgment]) -> dict[str, UnitTable]:
    """One :class:`UnitTable` per judgment family present (see module docstring)."""
    judgments = list(judgments)
    validate_judgments(items, judgments)
    cells: dict[str, dict[tuple[Any, ...], dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for j in latest_judgments(judgments):
        for suffix, value in _unit_values(j):
            cells[j.kind][(j.item_id, *suffix)][j.annotator] = value
    tables = {}
    for family, by_unit in cells.items():
        annotators = sorted({a for row in by_unit.values() for a in row})
        column = {a: c for c, a in enumerate(annotators)}
        units = list(by_unit)
        values = np.full((len(units), len(annotators)), np.nan)
        for u, unit in enumerate(units):
            for annotator, value in by_unit[unit].items():
                values[u, column[annotator]] = value
        tables[family] = UnitTable(family, FAMILY_LEVEL[family], units, annotators, values)
    return tables


# --- The report ---


@dataclass
class AnnotatorQuality:
    """How one annotator compares with the panel."""

    annotator: str
    n_judgments: int
    agreement: float  # mean leave-one-out consensus score over all families (NaN: no overlap)
    n_consensus_units: int  # units that score was computed on
    mean_kappa: float  # mean Cohen's kappa against the other annotators (NaN: too little overlap)
    median_seconds: float  # NaN when no time was recorded
    too_fast: bool
    low_agreement: bool

    @property
    def flagged(self) -> bool:
        return self.too_fast or self.low_agreement


@dataclass
class AgreementReport:
    """Every agreement figure of a set of judgments; NaN marks "not computable"."""

    n_items: int
    n_judgments: int
    annotators: list[str]  # axis order of the kappa matrices
    alpha: dict[str, float]  # "family/level" -> Krippendorff's alpha
    fleiss: dict[str, float]  # family -> Fleiss' kappa on the units with the modal rater count
    fleiss_units: dict[str, int]  # family -> units Fleiss' kappa was computed on
    kappa: dict[str, np.ndarray]  # family -> (A, A) pairwise Cohen's kappa
    quality: dict[str, AnnotatorQuality] = field(default_factory=dict)

    def ranked(self) -> list[AnnotatorQuality]:
        """Annotators best first: by consensus agreement, then mean kappa; NaN last."""

        def key(q: AnnotatorQuality) -> tuple[float, float]:
            a = -q.agreement if not np.isnan(q.agreement) else np.inf
            k = -q.mean_kappa if not np.isnan(q.mean_kappa) else np.inf
            return (a, k)

        return sorted(self.quality.values(), key=key)

    @property
    def flagged(self) -> set[str]:
        """Annotators flagged too fast or low agreement."""
        return {q.annotator for q in self.quality.values() if q.flagged}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN -> None, arrays -> nested lists)."""
        out = {k: v for k, v in vars(self).items() if k != "quality"}
        out["quality"] = {n: {**vars(q), "flagged": q.flagged} for n, q in self.quality.items()}
        return _jsonable(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating):
        return None if np.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def _modal_complete(values: np.ndarray) -> np.ndarray:
    """Rows of the units rated by the most common number (>= 2) of raters, as a full table."""
    m_u = (~np.isnan(values)).sum(axis=1)
    eligible = m_u[m_u >= 2]
    if eligible.size == 0:
        return np.empty((0, 0))
    modal = Counter(eligible.tolist()).most_common(1)[0][0]
    rows = values[m_u == modal]
    return np.array([row[~np.isnan(row)] for row in rows])


def agreement_report(
    items: Iterable[Item],
    judgments: Iterable[Judgment],
    min_agreement: float = 0.6,
    min_seconds: float = 3.0,
    panel_fraction: float = 0.25,
    min_overlap: int = 5,
) -> AgreementReport:
    """Alpha, Fleiss' and Cohen's kappas, consensus agreement and speed flags.

    ``min_agreement``: an annotator whose consensus agreement is below it is flagged
    ``low_agreement``. ``min_seconds`` / ``panel_fraction``: see :func:`too_fast`.
    ``min_overlap``: fewest shared units for a pairwise Cohen's kappa.
    """
    items = list(items)
    judgments = list(judgments)
    tables = unit_tables(items, judgments)
    kept = latest_judgments(judgments)
    annotators = sorted({j.annotator for j in kept})
    column = {a: c for c, a in enumerate(annotators)}

    alpha, fleiss, fleiss_units, kappa = {}, {}, {}, {}
    score_sum = np.zeros(len(annotators))
    score_n = np.zeros(len(annotators))
    kappa_sum = np.zeros(len(annotators))
    kappa_n = np.zeros(len(annotators))
    for family, table in tables.items():
        levels: list[Level] = [table.level] + (["interval"] if family == "likert" else [])
        for level in levels:
            alpha[f"{family}/{level}"] = krippendorff_alpha(table.values, level)
        complete = _modal_complete(table.values)
        fleiss_units[family] = int(complete.shape[0])
        fleiss[family] = fleiss_kappa(complete) if complete.size else float("nan")
        weights: Weights = None if table.level == "nominal" else "linear"
        local = pairwise_kappa(table.values, weights, min_overlap)
        full = np.full((len(annotators), len(annotators)), np.nan)
        index = [column[a] for a in table.annotators]
        full[np.ix_(index, index)] = local
        kappa[family] = full
        if family == "ranking":  # consensus on the direction of each pair, by majority
            means, counts = consensus_agreement(np.sign(table.values), "nominal")
        else:
            means, counts = consensus_agreement(table.values, table.level)
        for c, annotator in enumerate(table.annotators):
            if counts[c]:
                score_sum[column[annotator]] += means[c] * counts[c]
                score_n[column[annotator]] += counts[c]
        off_diagonal = full.copy()
        np.fill_diagonal(off_diagonal, np.nan)
        kappa_sum += np.nansum(off_diagonal, axis=1)
        kappa_n += (~np.isnan(off_diagonal)).sum(axis=1)

    seconds: dict[str, list[float]] = defaultdict(list)
    n_judged: Counter[str] = Counter()
    for j in kept:
        seconds[j.annotator].append(j.seconds)
        n_judged[j.annotator] += 1
    fast = too_fast(seconds, min_seconds, panel_fraction)
    quality = {}
    for c, name in enumerate(annotators):
        agreement = score_sum[c] / score_n[c] if score_n[c] else float("nan")
        recorded = [t for t in seconds[name] if t > 0]
        quality[name] = AnnotatorQuality(
            annotator=name,
            n_judgments=n_judged[name],
            agreement=float(agreement),
            n_consensus_units=int(score_n[c]),
            mean_kappa=float(kappa_sum[c] / kappa_n[c]) if kappa_n[c] else float("nan"),
            median_seconds=float(np.median(recorded)) if recorded else float("nan"),
            too_fast=fast[name],
            low_agreement=bool(not np.isnan(agreement) and agreement < min_agreement),
        )
    return AgreementReport(
        n_items=len({j.item_id for j in kept}),
        n_judgments=len(kept),
        annotators=annotators,
        alpha=alpha,
        fleiss=fleiss,
        fleiss_units=fleiss_units,
        kappa=kappa,
        quality=quality,
    )
