"""Versioned labeling guidelines: editing never overwrites, it adds a version.

Every judgment records the version its annotator was shown, so a change of
instructions can be traced in the statistics.
"""

from __future__ import annotations

import time

import markdown as markdown_lib
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.feedback.queries import (
    NotFound,
    ProjectRef,
    current_guideline_version,
    find_project,
    find_user,
)
from alignkit.feedback.store import Store
from alignkit.feedback.store_records import Guidelines
from alignkit.feedback.tables import GuidelineRow

MAX_GUIDELINES_CHARS = 100_000


def set_guidelines(
    store: Store, project: ProjectRef, markdown: str, author: str | None = None
) -> int:
    """Store a new guideline version and return its number."""

    def work(session: Session) -> int:
        row = find_project(session, project)
        version = current_guideline_version(session, row.id) + 1
        author_id = find_user(session, author).id if author else None
        session.add(
            GuidelineRow(
                project_id=row.id,
                version=version,
                markdown=markdown[:MAX_GUIDELINES_CHARS],
                author_id=author_id,
                created_at=time.time(),
            )
        )
        session.flush()
        return version

    return store.run(work)


def get_guidelines(store: Store, project: ProjectRef, version: int | None = None) -> Guidelines:
    """The current guidelines, or a given version (raises NotFound)."""

    def work(session: Session) -> Guidelines:
        project_id = find_project(session, project).id
        wanted = version if version is not None else current_guideline_version(session, project_id)
        row = session.scalars(
            select(GuidelineRow).where(
                GuidelineRow.project_id == project_id, GuidelineRow.version == wanted
            )
        ).first()
        if row is None:
            raise NotFound(f"guideline version {wanted} not found")
        return Guidelines(row.version, row.markdown, row.created_at)

    return store.run(work)


def render_guidelines(markdown: str) -> Markup:
    """Guidelines as HTML; raw HTML in the Markdown is shown as text, never run."""
    escaped = markdown.replace("&", "&amp;").replace("<", "&lt;")
    html = markdown_lib.markdown(escaped, extensions=["tables", "fenced_code", "sane_lists"])
    return Markup(html)  # noqa: S704 - input escaped above
