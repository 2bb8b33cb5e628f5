"""Agreement statistics: cross-checked against krippendorff, statsmodels and scikit-learn."""

from __future__ import annotations

import math

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

from alignkit.errors import InputError
from alignkit.feedback.agreement import (
    agreement_report,
    cohen_kappa,
    consensus_agreement,
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_kappa,
    too_fast,
    unit_tables,
)
from alignkit.feedback.records import Item, Judgment

SEEDS = [0, 1, 2, 3, 4]


def random_table(
    seed: int, units: int = 40, raters: int = 5, levels: int = 5, missing: float = 0.3
):
    rng = np.random.default_rng(seed)
    # Correlated raters: a latent per unit plus noise, so alpha is far from 0.
    latent = rng.integers(1, levels + 1, size=(units, 1))
    table = np.clip(latent + rng.integers(-1, 2, size=(units, raters)), 1, levels).astype(float)
    table[rng.random(table.shape) < missing] = np.nan
    return table


# --- Krippendorff's alpha ---


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval", "ratio"])
def test_alpha_matches_krippendorff_package_with_missing_values(seed, level):
    table = random_table(seed)
    expected = krippendorff.alpha(reliability_data=table.T, level_of_measurement=level)
    assert krippendorff_alpha(table, level) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_matches_package_on_uncorrelated_non_integer_values(seed):
    rng = np.random.default_rng(100 + seed)
    table = rng.choice([-2.0, 0.5, 1.0, 3.5, 7.0], size=(25, 4))
    table[rng.random(table.shape) < 0.4] = np.nan
    for level in ("nominal", "ordinal", "interval"):
        expected = krippendorff.alpha(reliability_data=table.T, level_of_measurement=level)
        assert krippendorff_alpha(table, level) == pytest.approx(expected, abs=1e-9)


def test_hand_worked_example():
    # Two raters, three units: (a, a), (a, b), (b, b) with a = 0, b = 1.
    # Coincidences: o_aa = 2, o_ab = o_ba = 1, o_bb = 2; n_a = n_b = 3, n = 6.
    # D_o = 2/6, D_e = (3*3 + 3*3)/(6*5) = 0.6, alpha = 1 - (1/3)/0.6 = 4/9.
    table = np.array([[0, 0], [0, 1], [1, 1]], dtype=float)
    assert krippendorff_alpha(table, "nominal") == pytest.approx(4 / 9, abs=1e-12)
    # Cohen: p_o = 2/3, p_e = (2/3)(1/3) + (1/3)(2/3) = 4/9, kappa = (2/9)/(5/9) = 0.4.
    assert cohen_kappa(table[:, 0], table[:, 1]) == pytest.approx(0.4, abs=1e-12)
    # Fleiss: P_i = 1, 0, 1 -> P_bar = 2/3; p_a = p_b = 1/2 -> P_e = 1/2; kappa = 1/3.
    assert fleiss_kappa(table) == pytest.approx(1 / 3, abs=1e-12)
    # Adding a third rater to unit 2 only: a unit rated once is dropped, so alpha is unchanged.
    with_single = np.vstack([table, [[1, np.nan]]])
    assert krippendorff_alpha(with_single, "nominal") == pytest.approx(4 / 9, abs=1e-12)


def test_alpha_edge_cases():
    assert math.isnan(krippendorff_alpha(np.full((3, 2), 2.0)))  # no variation
    assert math.isnan(
        krippendorff_alpha(np.array([[1.0, np.nan], [np.nan, 2.0]]))
    )  # nothing pairable
    assert krippendorff_alpha(np.array([[1, 1], [2, 2], [3, 3.0]]), "interval") == 1.0
    with pytest.raises(InputError):
        krippendorff_alpha(np.ones(4))
    with pytest.raises(InputError):
        krippendorff_alpha(np.ones((2, 2)), "cosine")


# --- Fleiss' and Cohen's kappa ---


@pytest.mark.parametrize("seed", SEEDS)
def test_fleiss_matches_statsmodels(seed):
    table = random_table(seed, units=30, raters=4, missing=0.0)
    counts, _ = aggregate_raters(table)
    assert fleiss_kappa(table) == pytest.approx(sm_fleiss_kappa(counts, method="fleiss"), abs=1e-9)


def test_fleiss_rejects_missing_ratings():
    table = random_table(0)
    with pytest.raises(InputError, match="every subject"):
        fleiss_kappa(table)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_matches_sklearn(seed, weights):
    table = random_table(seed, units=60, raters=2, levels=6, missing=0.0)
    expected = cohen_kappa_score(table[:, 0], table[:, 1], weights=weights)
    assert cohen_kappa(table[:, 0], table[:, 1], weights) == pytest.approx(expected, abs=1e-9)


def test_cohen_with_explicit_labels_matches_sklearn():
    a = np.array([1, 1, 3, 7, 7, 3, 1, 7])
    b = np.array([1, 3, 3, 7, 3, 3, 1, 1])
    labels = [1, 2, 3, 4, 5, 6, 7]
    for weights in (None, "linear", "quadratic"):
        expected = cohen_kappa_score(a, b, weights=weights, labels=labels)
        assert cohen_kappa(a, b, weights, labels) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(InputError):
        cohen_kappa(a, b, None, [1, 3])


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_pairwise_kappa_matrix_matches_sklearn_on_overlaps(seed):
    table = random_table(seed, units=50, raters=4, missing=0.3)
    labels = np.unique(table[~np.isnan(table)])
    for weights in (None, "linear"):
        matrix = pairwise_kappa(table, weights, min_overlap=5)
        assert np.allclose(matrix, matrix.T, equal_nan=True)
        assert np.all(np.diag(matrix) == 1.0)
        for r in range(4):
            for s in range(r + 1, 4):
                both = ~np.isnan(table[:, r]) & ~np.isnan(table[:, s])
                expected = cohen_kappa_score(
                    table[both, r], table[both, s], weights=weights, labels=labels
                )
                assert matrix[r, s] == pytest.approx(expected, abs=1e-9)
    sparse = np.array([[1, 1.0], [2, 2], [1, np.nan]])
    assert math.isnan(pairwise_kappa(sparse, min_overlap=3)[0, 1])


# --- Consensus and speed ---


def test_consensus_agreement_by_hand():
    # Rater 2 disagrees with the others on unit 0; unit 1 has a split consensus for rater 0.
    table = np.array(
        [
            [1, 1, 0, 1],
            [1, 0, 1, 0],
            [0, 0, 0, np.nan],
        ],
        dtype=float,
    )
    means, counts = consensus_agreement(table, "nominal")
    # Rater 0: unit 0 others {1,0,1} -> 1, match; unit 1 others {0,1,0} -> 0, miss; unit 2 match.
    assert means[0] == pytest.approx(2 / 3) and counts[0] == 3
    # Rater 2: unit 0 others {1,1,1} -> miss; unit 1 others {1,0,0} -> 0, miss; unit 2 match.
    assert means[2] == pytest.approx(1 / 3)
    # Rater 3: unit 0 match; unit 1 others {1,0,1} -> 1, miss; not in unit 2.
    assert means[3] == pytest.approx(1 / 2) and counts[3] == 2
    # Interval: score 1 - |x - median(others)| / span (span = 6 here).
    likert = np.array([[1, 4, 7], [4, 4, 4.0]])
    means, _ = consensus_agreement(likert, "interval")
    assert means[0] == pytest.approx((1 - 4.5 / 6 + 1) / 2)
    assert means[1] == pytest.approx(1.0)


def test_too_fast_flags_absolute_and_relative():
    seconds = {
        "steady": [20, 25, 30],
        "quick": [2, 2.5, 2],  # below the absolute floor of 3 s
        "skimmer": [4, 5, 4],  # 4 s < 0.25 x panel median (20 s) but above the floor
        "careful": [18, 20, 22],
        "reader": [22],
        "unknown": [0, 0],  # no timing recorded
    }
    flags = too_fast(seconds, min_seconds=3.0, panel_fraction=0.25)
    assert flags == {
        "steady": False,
        "quick": True,
        "skimmer": True,
        "careful": False,
        "reader": False,
        "unknown": False,
    }


# --- Judgments -> units -> report ---


def make_items():
    return [
        Item("p1", "q1", ("a", "b")),
        Item("r1", "q2", ("a", "b", "c")),
        Item("t1", "q3", ("a", "b")),
    ]


def test_unit_tables_turn_judgments_into_the_right_units():
    judgments = [
        Judgment("p1", "ann", "pairwise", ranking=((1,), (0,))),
        Judgment("p1", "bob", "pairwise", ranking=((0, 1),), both_bad=True),
        Judgment("r1", "ann", "ranking", ranking=((2,), (0,), (1,))),
        Judgment("r1", "bob", "ranking", ranking=((0, 2), (1,))),
        Judgment("t1", "ann", "thumbs", ratings={0: 1.0, 1: 0.0}),
        Judgment("t1", "ann", "likert", ratings={0: 6.0, 1: 2.0}),
        Judgment("t1", "bob", "likert", ratings={0: 5.0}, created_at=1.0),
        Judgment("t1", "bob", "likert", ratings={0: 7.0}, created_at=0.5),  # older: ignored
    ]
    tables = unit_tables(make_items(), judgments)
    assert set(tables) == {"pairwise", "ranking", "thumbs", "likert"}
    pairwise = tables["pairwise"]
    assert pairwise.level == "nominal" and pairwise.units == [("p1", 0, 1)]
    assert pairwise.values.tolist() == [[-1.0, 0.0]]  # second better; tie
    ranking = tables["ranking"]
    assert ranking.level == "ordinal"
    rows = dict(zip(ranking.units, ranking.values.tolist(), strict=True))
    # ann: 2 > 0 > 1, so (0,1) = +1, (0,2) = -1, (1,2) = -2; bob: {0,2} > 1.
    assert rows[("r1", 0, 1)] == [1.0, 1.0]
    assert rows[("r1", 0, 2)] == [-1.0, 0.0]
    assert rows[("r1", 1, 2)] == [-2.0, -1.0]
    assert tables["thumbs"].values.tolist() == [[1.0], [0.0]]
    likert = tables["likert"]
    assert likert.annotators == ["ann", "bob"]
    assert likert.values[0].tolist() == [6.0, 5.0]
    assert likert.values[1, 0] == 2.0 and np.isnan(likert.values[1, 1])


def test_validation_names_the_bad_field():
    items = make_items()
    with pytest.raises(InputError, match="unknown item"):
        unit_tables(items, [Judgment("nope", "a", "thumbs", ratings={0: 1.0})])
    with pytest.raises(InputError) as err:
        unit_tables(items, [Judgment("r1", "a", "ranking", ranking=((0,), (0,)))])
    assert err.value.field == "ranking"
    with pytest.raises(InputError, match="pairwise needs 2"):
        unit_tables(items, [Judgment("r1", "a", "pairwise", ranking=((0,), (1,)))])
    with pytest.raises(InputError, match="thumbs must be 0 or 1"):
        unit_tables(items, [Judgment("t1", "a", "thumbs", ratings={0: 3.0})])
    with pytest.raises(InputError):
        unit_tables(items, [Judgment("t1", "a", "likert", ratings={5: 3.0})])


def test_report_figures_equal_the_table_statistics():
    rng = np.random.default_rng(7)
    items = [Item(f"i{n}", f"q{n}", ("x", "y", "z")) for n in range(40)]
    judgments = []
    for item in items:
        truth = rng.integers(1, 8, size=3)
        for rater in range(4):
            if rng.random() < 0.2:
                continue
            scores = np.clip(truth + rng.integers(-1, 2, size=3), 1, 7)
            judgments.append(
                Judgment(
                    item.item_id,
                    f"r{rater}",
                    "likert",
                    ratings={k: float(v) for k, v in enumerate(scores)},
                    seconds=10.0 + rater,
                )
            )
    report = agreement_report(items, judgments, min_overlap=5)
    table = unit_tables(items, judgments)["likert"]
    for level in ("ordinal", "interval"):
        expected = krippendorff.alpha(reliability_data=table.values.T, level_of_measurement=level)
        assert report.alpha[f"likert/{level}"] == pytest.approx(expected, abs=1e-9)
    full = table.values[(~np.isnan(table.values)).all(axis=1)]
    assert report.fleiss_units["likert"] == full.shape[0]
    counts, _ = aggregate_raters(full)
    assert report.fleiss["likert"] == pytest.approx(sm_fleiss_kappa(counts), abs=1e-9)
    labels = np.unique(table.values[~np.isnan(table.values)])
    both = ~np.isnan(table.values[:, 0]) & ~np.isnan(table.values[:, 1])
    expected = cohen_kappa_score(
        table.values[both, 0], table.values[both, 1], weights="linear", labels=labels
    )
    assert report.kappa["likert"][0, 1] == pytest.approx(expected, abs=1e-9)
    assert report.annotators == ["r0", "r1", "r2", "r3"]
    assert all(0.7 < q.agreement <= 1.0 and not q.flagged for q in report.quality.values())
    assert report.quality["r3"].median_seconds == 13.0
    as_json = report.to_dict()
    assert as_json["quality"]["r0"]["flagged"] is False
    assert isinstance(as_json["kappa"]["likert"][0][0], float)
