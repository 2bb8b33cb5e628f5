"""Chat sessions of the labeling app: a user talks to a served model and rates its replies.

A reply to rate becomes an item created on the fly (prompt = the conversation so
far, completions = the sampled replies), reserved for its author and leased to
them; the rating goes through :meth:`Store.submit_judgment` like any other
judgment, so chat ratings export the same way, per user if wanted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignkit.feedback.queries import NotFound, ProjectRef, StoreError, find_project, find_user
from alignkit.feedback.records import Item
from alignkit.feedback.store import Lease, Store
from alignkit.feedback.tables import ChatMessageRow, ChatSessionRow, ItemRow

PENDING = "pending"  # role of the placeholder turn until its reply is rated


@dataclass(frozen=True)
class ChatTurn:
    """One turn as shown: role ``user``, ``assistant`` or ``pending`` (awaiting a rating)."""

    role: str
    content: str
    item_id: str | None


def _owned_session(session: Session, session_id: int, user: str) -> ChatSessionRow:
    row = session.get(ChatSessionRow, session_id)
    if row is None or row.user_id != find_user(session, user).id:
        raise NotFound(f"chat session {session_id} not found")
    return row


def latest_chat_session(store: Store, project: ProjectRef, user: str, fresh: bool = False) -> int:
    """The user's newest chat session in the project (a new one if none, or if ``fresh``)."""

    def work(session: Session) -> int:
        project_row = find_project(session, project)
        if project_row.mode != "chat":
            raise StoreError(f"project {project_row.name!r} is not a chat project")
        user_id = find_user(session, user).id
        newest = session.scalar(
            select(func.max(ChatSessionRow.id)).where(
                ChatSessionRow.project_id == project_row.id, ChatSessionRow.user_id == user_id
            )
        )
        if newest is not None and not fresh:
            return int(newest)
        row = ChatSessionRow(project_id=project_row.id, user_id=user_id, created_at=time.time())
        session.add(row)
        session.flush()
        return row.id

    return store.run(work)


def chat_transcript(store: Store, session_id: int, user: str) -> list[ChatTurn]:
    """The session's turns in order (only its owner may read them)."""

    def work(session: Session) -> list[ChatTurn]:
        _owned_session(session, session_id, user)
        rows = session.execute(
            select(ChatMessageRow, ItemRow.item_key)
            .outerjoin(ItemRow, ChatMessageRow.item_id == ItemRow.id)
            .where(ChatMessageRow.session_id == session_id)
            .order_by(ChatMessageRow.position)
        ).all()
        return [ChatTurn(row.role, row.content, key) for row, key in rows]

    return store.run(work)


def _append(
    session: Session, session_id: int, role: str, content: str, item_row_id: int | None
) -> None:
    position = session.scalar(
        select(func.coalesce(func.max(ChatMessageRow.position), -1)).where(
            ChatMessageRow.session_id == session_id
        )
    )
    session.add(
        ChatMessageRow(
            session_id=session_id,
            position=position + 1,
            role=role,
            content=content,
            item_id=item_row_id,
            created_at=time.time(),
        )
    )


def add_user_turn(store: Store, session_id: int, user: str, content: str) -> list[dict[str, str]]:
    """Append the user's message; returns the conversation as chat messages for the model."""

    def work(session: Session) -> None:
        _owned_session(session, session_id, user)
        last = session.scalars(
            select(ChatMessageRow)
            .where(ChatMessageRow.session_id == session_id)
            .order_by(ChatMessageRow.position.desc())
            .limit(1)
        ).first()
        if last is not None and last.role == PENDING:
            raise StoreError("rate the last reply before you write again")
        _append(session, session_id, "user", content, None)
        session.flush()

    store.run(work)
    turns = chat_transcript(store, session_id, user)
    return [
        {"role": t.role, "content": t.content} for t in turns if t.role in ("user", "assistant")
    ]


def add_replies_to_rate(
    store: Store,
    project: ProjectRef,
    session_id: int,
    user: str,
    conversation: list[dict[str, str]],
    replies: list[str],
    model: str,
) -> Lease:
    """Create the item for these replies (reserved for ``user``), lease it, mark the turn pending."""
    item = Item(
        item_id=f"chat-{uuid.uuid4().hex[:16]}",
        prompt=conversation,
        completions=tuple(replies),
        metadata={"chat_session": session_id, "model": model, "user": user},
    )
    store.add_items(project, [item], reserved_for=user)
    lease = store.lease_item(project, user, item.item_id)

    def work(session: Session) -> None:
        _owned_session(session, session_id, user)
        item_row = session.scalars(select(ItemRow).where(ItemRow.item_key == item.item_id)).one()
        _append(session, session_id, PENDING, "", item_row.id)
        session.flush()

    store.run(work)
    return lease


def resolve_pending_turn(
    store: Store, session_id: int, user: str, item_id: str, reply: str
) -> None:
    """After the rating, the pending turn becomes the assistant's reply ``reply``."""

    def work(session: Session) -> None:
        _owned_session(session, session_id, user)
        row = session.scalars(
            select(ChatMessageRow)
            .join(ItemRow, ChatMessageRow.item_id == ItemRow.id)
            .where(
                ChatMessageRow.session_id == session_id,
                ChatMessageRow.role == PENDING,
                ItemRow.item_key == item_id,
            )
        ).first()
        if row is None:
            raise NotFound("no reply waiting for a rating")
        row.role = "assistant"
        row.content = reply

    store.run(work)
