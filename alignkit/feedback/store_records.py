"""Read-only records the store hands out: users, projects, guidelines, leases, progress."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.feedback.records import Item, Judgment
from alignkit.feedback.tables import ItemRow, JudgmentRow


@dataclass(frozen=True)
class UserInfo:
    """A user as the app sees it (never the password hash)."""

    id: int
    name: str
    role: str


@dataclass(frozen=True)
class ProjectInfo:
    """A project's settings and its current guideline version."""

    id: int
    name: str
    kind: str
    num_completions: int
    overlap: int
    lease_seconds: int
    mode: str
    chat_model: str | None
    guideline_version: int
    created_at: float


@dataclass(frozen=True)
class Guidelines:
    """One version of a project's Markdown guidelines."""

    version: int
    markdown: str
    created_at: float


@dataclass(frozen=True)
class Lease:
    """An item handed to one annotator until ``expires_at``, shown in ``display_order``."""

    project_id: int
    item: Item
    annotator: str
    slot: int
    display_order: tuple[int, ...]
    leased_at: float
    expires_at: float
    guideline_version: int


@dataclass(frozen=True)
class Progress:
    """How far a project is: counts, and judgments per annotator."""

    items: int
    judgments: int
    complete_items: int
    open_leases: int
    by_annotator: dict[str, int]


def item_record(row: ItemRow) -> Item:
    return Item(
        item_id=row.item_key,
        prompt=row.prompt,
        completions=tuple(row.completions),
        metadata=dict(row.item_metadata),
    )


def judgment_record(row: JudgmentRow, item_key: str, annotator: str) -> Judgment:
    return Judgment(
        item_id=item_key,
        annotator=annotator,
        kind=row.kind,
        ranking=None if row.ranking is None else tuple(tuple(group) for group in row.ranking),
        ratings=None if row.ratings is None else {int(k): float(v) for k, v in row.ratings.items()},
        both_bad=bool(row.both_bad),
        seconds=row.seconds,
        display_order=tuple(row.display_order),
        guideline_version=row.guideline_version,
        source=row.source,
        created_at=row.created_at,
        probability=row.probability,
    )
