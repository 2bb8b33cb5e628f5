"""SQLAlchemy tables of the feedback store.

Times are unix seconds (``Double``) so that they round-trip exactly into
:class:`~alignkit.feedback.records.Judgment`. The ``leases`` table is the slot
ledger that bounds the overlap: an item has ``overlap`` numbered slots, a lease
holds one (``UniqueConstraint(item_id, slot)``), and a submitted judgment turns
its lease to ``state='done'`` for good. So ``open leases + judgments <= overlap``
holds by construction, on any database, under any concurrency.

The migration in ``migrations/versions`` creates exactly these tables (a test
compares them) plus triggers that refuse UPDATE and DELETE on ``judgments``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("admin", "annotator")
PROJECT_MODES = ("items", "chat")
LEASE_OPEN = "open"
LEASE_DONE = "done"


class Base(DeclarativeBase):
    """Declarative base of every feedback table."""


class UserRow(Base):
    """A person (or a simulated / AI annotator) who can judge items."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (CheckConstraint("role IN ('admin', 'annotator')", name="ck_users_role"),)


class SettingRow(Base):
    """Server-wide key/value settings (the cookie signing secret lives here)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ProjectRow(Base):
    """A labeling project: one task type, one number of completions, one overlap."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    num_completions: Mapped[int] = mapped_column(Integer)
    overlap: Mapped[int] = mapped_column(Integer)
    lease_seconds: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(8))
    chat_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (
        CheckConstraint(
            "kind IN ('pairwise', 'ranking', 'thumbs', 'likert')", name="ck_projects_kind"
        ),
        CheckConstraint("overlap >= 1", name="ck_projects_overlap"),
        CheckConstraint("num_completions >= 1", name="ck_projects_num_completions"),
    )


class GuidelineRow(Base):
    """One version of a project's guidelines (Markdown). Editing adds a version."""

    __tablename__ = "guideline_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    version: Mapped[int] = mapped_column(Integer)
    markdown: Mapped[str] = mapped_column(Text)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (UniqueConstraint("project_id", "version", name="uq_guideline_version"),)


class ItemRow(Base):
    """A prompt with its completions; ``reserved_user_id`` pins a chat item to its author."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    item_key: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[Any] = mapped_column(JSON)
    completions: Mapped[list[str]] = mapped_column(JSON)
    item_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    reserved_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (
        UniqueConstraint("project_id", "item_key", name="uq_item_key"),
        Index("ix_items_project_position", "project_id", "position"),
    )


class LeaseRow(Base):
    """One of an item's ``overlap`` slots, held by an annotator until done or expired."""

    __tablename__ = "leases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    slot: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    state: Mapped[str] = mapped_column(String(8))
    display_order: Mapped[list[int]] = mapped_column(JSON)
    leased_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (
        UniqueConstraint("item_id", "slot", name="uq_lease_slot"),
        UniqueConstraint("item_id", "user_id", name="uq_lease_user"),
        CheckConstraint("slot >= 0", name="ck_leases_slot"),
        CheckConstraint("state IN ('open', 'done')", name="ck_leases_state"),
        Index("ix_leases_user_state", "user_id", "state"),
    )


class JudgmentRow(Base):
    """An immutable verdict; the database refuses UPDATE and DELETE on this table."""

    __tablename__ = "judgments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16))
    ranking: Mapped[list[list[int]] | None] = mapped_column(JSON, nullable=True)
    ratings: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    both_bad: Mapped[bool] = mapped_column(Boolean)
    seconds: Mapped[float] = mapped_column(Double)
    display_order: Mapped[list[int]] = mapped_column(JSON)
    guideline_version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Double)
    probability: Mapped[float | None] = mapped_column(Double, nullable=True)
    __table_args__ = (
        UniqueConstraint("item_id", "user_id", name="uq_judgment_user"),
        Index("ix_judgments_project", "project_id", "id"),
    )


class SkipRow(Base):
    """An annotator passed on an item; it is not offered to them again."""

    __tablename__ = "skips"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_skip_user"),)


class ChatSessionRow(Base):
    """A conversation between one user and a served model inside a chat project."""

    __tablename__ = "chat_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[float] = mapped_column(Double)


class ChatMessageRow(Base):
    """One turn of a chat session; an assistant turn links the item its rating judges."""

    __tablename__ = "chat_messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (UniqueConstraint("session_id", "position", name="uq_chat_position"),)
