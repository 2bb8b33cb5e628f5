"""Row lookups and errors shared by the store modules (store, accounts, guidelines, chat)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignkit.errors import InputError
from alignkit.feedback.store_records import ProjectInfo
from alignkit.feedback.tables import GuidelineRow, ItemRow, ProjectRow, UserRow

ProjectRef = str | int  # a project's name, or its id
MAX_ROW_ID = 2**31  # ids are 32-bit INTEGER columns


class StoreError(InputError):
    """A request the store refuses: unknown project or user, no lease, already judged."""


class NotFound(StoreError):
    """No such project, item or user."""


class LeaseError(StoreError):
    """The annotator holds no lease on the item (never leased, or expired and taken over)."""


def find_project(session: Session, project: ProjectRef) -> ProjectRow:
    """The project named (str) or numbered (int) ``project``; raises NotFound."""
    if isinstance(project, int) and not 0 < project < MAX_ROW_ID:
        raise NotFound(f"project {project!r} not found")  # also out of the INTEGER range
    column = ProjectRow.id if isinstance(project, int) else ProjectRow.name
    row = session.scalars(select(ProjectRow).where(column == project)).first()
    if row is None:
        raise NotFound(f"project {project!r} not found")
    return row


def find_user(session: Session, name: str) -> UserRow:
    """The user called ``name``; raises NotFound."""
    row = session.scalars(select(UserRow).where(UserRow.name == name)).first()
    if row is None:
        raise NotFound(f"user {name!r} not found")
    return row


def find_item(session: Session, project_id: int, key: str) -> ItemRow:
    """The project's item whose ``Item.item_id`` is ``key``; raises NotFound."""
    row = session.scalars(
        select(ItemRow).where(ItemRow.project_id == project_id, ItemRow.item_key == key)
    ).first()
    if row is None:
        raise NotFound(f"item {key!r} not found in project")
    return row


def current_guideline_version(session: Session, project_id: int) -> int:
    """The newest guideline version of a project (1 when it never changed)."""
    latest = select(func.max(GuidelineRow.version)).where(GuidelineRow.project_id == project_id)
    return int(session.scalar(latest) or 1)


def project_info(session: Session, row: ProjectRow) -> ProjectInfo:
    """A project row as the read-only record callers get."""
    return ProjectInfo(
        id=row.id,
        name=row.name,
        kind=row.kind,
        num_completions=row.num_completions,
        overlap=row.overlap,
        lease_seconds=row.lease_seconds,
        mode=row.mode,
        chat_model=row.chat_model,
        guideline_version=current_guideline_version(session, row.id),
        created_at=row.created_at,
    )
