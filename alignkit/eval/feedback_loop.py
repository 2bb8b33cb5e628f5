"""The demo's feedback stage: samples -> simulated panel through the store -> agreement -> pairs.

Everything goes through the same code paths as people labeling in the web app: items
are added to a :class:`~alignkit.feedback.store.Store` project, each simulated judgment
is leased with ``Store.lease_item`` and recorded with ``Store.submit_judgment``, and
the agreement report, the exclusion of flagged annotators and the aggregation into
preference pairs read the judgments back from the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.feedback.records import Item
from alignkit.tasks import Prompt

PROJECT = "demo"


@dataclass
class FeedbackResult:
    """What the feedback stage produced."""

    pairs_path: Path
    num_items: int
    num_judgments: int
    num_pairs: int
    annotators: list[str]  # axis order of ``kappa``
    annotator_kinds: dict[str, str]  # the simulation's ground truth, for the report
    kappa: np.ndarray  # (A, A) pairwise Cohen's kappa on the ranking units
    excluded: list[str]  # annotators left out of the pairs
    agreement: dict[str, Any]  # the full agreement report (JSON-ready)


def make_items(
    prompts: Sequence[Prompt], completions: Sequence[Sequence[str]], gold: np.ndarray
) -> list[Item]:
    """One ranking item per prompt; the gold scores ride along in the metadata."""
    return [
        Item(f"p{i:04d}", prompt, tuple(texts), {"gold": [float(g) for g in gold[i]]})
        for i, (prompt, texts) in enumerate(zip(prompts, completions, strict=True))
    ]


def run_panel(
    db_path: Path,
    items: list[Item],
    gold_fn: Callable[[Any, Sequence[str]], Sequence[float]],
    annotators: int,
    careless: int,
    adversarial: int,
    overlap: int,
    noise: float,
    seed: int,
    pairs_path: Path,
) -> FeedbackResult:
    """Label ``items`` with a simulated panel through the store; write the pairs JSONL."""
    from alignkit.feedback.accounts import ensure_user
    from alignkit.feedback.aggregate import aggregate_pairs, excluded_annotators, write_jsonl
    from alignkit.feedback.agreement import agreement_report
    from alignkit.feedback.simulate import make_panel, simulate_judgments
    from alignkit.feedback.store import Store

    store = Store(f"sqlite:///{db_path}")
    try:
        k = len(items[0].completions)
        store.create_project(PROJECT, "ranking", num_completions=k, overlap=overlap)
        store.add_items(PROJECT, items)
        panel = make_panel(annotators, careless / annotators, adversarial / annotators, seed)
        for member in panel:
            ensure_user(store, member.name)
        simulated = simulate_judgments(items, gold_fn, panel, "ranking", overlap, noise, seed)
        for judgment in simulated:  # the same lease + submit path as people
            store.lease_item(PROJECT, judgment.annotator, judgment.item_id)
            store.submit_judgment(PROJECT, judgment.annotator, judgment)
        stored_items, judgments = store.items(PROJECT), store.judgments(PROJECT)
    finally:
        store.close()
    report = agreement_report(stored_items, judgments)
    excluded = sorted(excluded_annotators(report))
    rows = aggregate_pairs(stored_items, judgments, method="bradley_terry", exclude=excluded)
    rows = [row for row in rows if row["chosen"] != row["rejected"]]
    write_jsonl(rows, pairs_path)
    kappa = report.kappa.get("ranking", np.full((len(report.annotators),) * 2, np.nan))
    return FeedbackResult(
        pairs_path=pairs_path,
        num_items=len(stored_items),
        num_judgments=len(judgments),
        num_pairs=len(rows),
        annotators=list(report.annotators),
        annotator_kinds={member.name: member.kind for member in panel},
        kappa=np.asarray(kappa, dtype=float),
        excluded=excluded,
        agreement=report.to_dict(),
    )


def load_feedback(path: Path, pairs_path: Path) -> FeedbackResult:
    """A :class:`FeedbackResult` back from :func:`save_feedback`'s JSON (to resume a run)."""
    data = json.loads(path.read_text())
    kappa = [[np.nan if v is None else v for v in row] for row in data["kappa"]]
    return FeedbackResult(
        pairs_path=pairs_path,
        num_items=data["num_items"],
        num_judgments=data["num_judgments"],
        num_pairs=data["num_pairs"],
        annotators=data["annotators"],
        annotator_kinds=data["annotator_kinds"],
        kappa=np.asarray(kappa, dtype=float),
        excluded=data["excluded"],
        agreement=data["agreement"],
    )


def save_feedback(result: FeedbackResult, path: Path) -> None:
    """The stage's summary as JSON (the report reads the kappa matrix from it)."""
    data = {
        "num_items": result.num_items,
        "num_judgments": result.num_judgments,
        "num_pairs": result.num_pairs,
        "annotators": result.annotators,
        "annotator_kinds": result.annotator_kinds,
        "kappa": [[None if np.isnan(v) else float(v) for v in row] for row in result.kappa],
        "excluded": result.excluded,
        "agreement": result.agreement,
    }
    path.write_text(json.dumps(data, indent=2))
