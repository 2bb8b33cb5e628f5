"""Store -> training data: the rows ``alignkit label export`` and the admin download write.

Pairs (TRL preference rows) or unpaired (KTO rows) come from
:mod:`alignkit.feedback.aggregate`; flagged annotators come from
:mod:`alignkit.feedback.agreement`.
"""

from __future__ import annotations

from typing import Any, Literal

from alignkit.errors import InputError
from alignkit.feedback.aggregate import aggregate_pairs, aggregate_unpaired, excluded_annotators
from alignkit.feedback.agreement import AgreementReport, agreement_report
from alignkit.feedback.store import ProjectRef, Store

ExportFormat = Literal["pairs", "unpaired"]
AGGREGATE_METHODS = {
    "majority": "majority",
    "bt": "bradley_terry",
    "pl": "plackett_luce",
    "none": "none",
}


def project_report(store: Store, project: ProjectRef) -> AgreementReport:
    """The agreement report of every judgment in the project."""
    return agreement_report(store.items(project), store.judgments(project))


def export_rows(
    store: Store,
    project: ProjectRef,
    export_format: ExportFormat = "pairs",
    ties: Literal["drop", "keep"] = "drop",
    aggregate: str = "majority",
    min_agreement: float = 0.0,
    exclude_flagged: bool = False,
    annotator: str | None = None,
) -> list[dict[str, Any]]:
    """Training rows of a project, optionally from one annotator's judgments only."""
    if export_format not in ("pairs", "unpaired"):
        raise InputError("must be pairs or unpaired", field="format")
    if ties not in ("drop", "keep"):
        raise InputError("must be drop or keep", field="ties")
    if aggregate not in AGGREGATE_METHODS:
        raise InputError(f"must be one of {', '.join(AGGREGATE_METHODS)}", field="aggregate")
    if not 0.0 <= min_agreement <= 1.0:
        raise InputError("must be between 0 and 1", field="min_agreement")
    items = store.items(project)
    judgments = store.judgments(project, annotator)
    exclude: set[str] = set()
    if exclude_flagged:
        exclude = excluded_annotators(agreement_report(items, store.judgments(project)))
    if export_format == "pairs":
        return aggregate_pairs(
            items,
            judgments,
            method=AGGREGATE_METHODS[aggregate],  # type: ignore[arg-type]
            keep_ties=ties == "keep",
            min_agreement=min_agreement,
            exclude=exclude,
        )
    return aggregate_unpaired(
        items,
        judgments,
        method="none" if aggregate == "none" else "majority",
        min_agreement=min_agreement,
        exclude=exclude,
    )
