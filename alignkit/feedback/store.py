"""The feedback store: the one code path through which people, simulated panels and
AI judges record judgments.

>>> store = Store("sqlite:///label.db")           # migrates the schema
>>> store.create_project("helpful", "pairwise", num_completions=2, overlap=3)
>>> store.add_items("helpful", read_prompts_file("samples.jsonl", 2))
>>> lease = store.lease_next("helpful", "ann")     # an item and its display order
>>> store.submit_judgment("helpful", "ann", Judgment(lease.item.item_id, "ann", "pairwise", ((1,), (0,))))
>>> store.judgments("helpful")                     # list[Judgment], oldest first

A project is named by its name (str) or its id (int); an annotator by user name.
Users and passwords live in :mod:`.accounts`, guideline versions in
:mod:`.guidelines`. Overlap is guaranteed by the ``leases`` slot ledger (see
:mod:`.tables`), leases expire after ``lease_seconds`` and may then be taken over,
and judgments are immutable (no update or delete here, and triggers refuse them in the database).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from sqlalchemy import Select, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from alignkit.errors import InputError
from alignkit.feedback import db
from alignkit.feedback.queries import (
    LeaseError,
    NotFound,
    ProjectRef,
    StoreError,
    current_guideline_version,
    find_item,
    find_project,
    find_user,
    project_info,
)
from alignkit.feedback.records import Item, Judgment
from alignkit.feedback.store_records import (
    Guidelines,
    Lease,
    Progress,
    ProjectInfo,
    UserInfo,
    item_record,
    judgment_record,
)
from alignkit.feedback.tables import (
    LEASE_DONE,
    LEASE_OPEN,
    GuidelineRow,
    ItemRow,
    JudgmentRow,
    LeaseRow,
    ProjectRow,
    SkipRow,
    UserRow,
)
from alignkit.feedback.validation import check_item, check_judgment, check_project_shape

T = TypeVar("T")
__all__ = [
    "Guidelines",
    "Lease",
    "LeaseError",
    "NotFound",
    "Progress",
    "ProjectInfo",
    "ProjectRef",
    "Store",
    "StoreError",
    "UserInfo",
]


class Store:
    """Service functions over one database (SQLite file or PostgreSQL URL)."""

    def __init__(self, url: str = db.DEFAULT_URL, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = db.make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._postgres = db.is_postgres(self.engine)
        if migrate:
            db.migrate(self.engine)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work(session)`` in one transaction, retried when it loses a race."""
        return db.run_transaction(self._sessions, work)

    # ---- projects, guidelines, items ------------------------------------------

    def create_project(
        self,
        name: str,
        kind: str,
        num_completions: int,
        overlap: int = 3,
        guidelines: str = "",
        lease_seconds: int = 900,
        mode: str = "items",
        chat_model: str | None = None,
    ) -> ProjectInfo:
        """Create a project with guideline version 1."""
        if not name.strip() or len(name) > 100:
            raise InputError("must be 1-100 characters", field="name")
        check_project_shape(kind, num_completions, overlap)
        if lease_seconds < 10:
            raise InputError("must be at least 10 seconds", field="lease_seconds")
        if mode not in ("items", "chat"):
            raise InputError("must be items or chat", field="mode")

        def work(session: Session) -> ProjectInfo:
            if session.scalars(select(ProjectRow).where(ProjectRow.name == name)).first():
                raise StoreError(f"project {name!r} already exists")
            now = time.time()
            row = ProjectRow(
                name=name,
                kind=kind,
                num_completions=num_completions,
                overlap=overlap,
                lease_seconds=lease_seconds,
                mode=mode,
                chat_model=chat_model,
                created_at=now,
            )
            session.add(row)
            session.flush()
            session.add(
                GuidelineRow(project_id=row.id, version=1, markdown=guidelines, created_at=now)
            )
            session.flush()
            return project_info(session, row)

        return self.run(work)

    def project(self, project: ProjectRef) -> ProjectInfo:
        """A project's settings (raises NotFound)."""
        return self.run(lambda s: project_info(s, find_project(s, project)))

    def projects(self) -> list[ProjectInfo]:
        """Every project, oldest first."""
        return self.run(
            lambda s: [
                project_info(s, row)
                for row in s.scalars(select(ProjectRow).order_by(ProjectRow.id))
            ]
        )

    def add_items(
        self, project: ProjectRef, items: Iterable[Item], reserved_for: str | None = None
    ) -> int:
        """Append items; an identical item already present is skipped. Returns how many were added."""
        batch = list(items)

        def work(session: Session) -> int:
            row = find_project(session, project)
            reserved_id = find_user(session, reserved_for).id if reserved_for else None
            existing = {
                key: (prompt, completions)
                for key, prompt, completions in session.execute(
                    select(ItemRow.item_key, ItemRow.prompt, ItemRow.completions).where(
                        ItemRow.project_id == row.id
                    )
                )
            }
            position = session.scalar(
                select(func.coalesce(func.max(ItemRow.position), -1)).where(
                    ItemRow.project_id == row.id
                )
            )
            added, now = 0, time.time()
            for item in batch:
                check_item(item, row.num_completions)
                if item.item_id in existing:
                    if existing[item.item_id] != (item.prompt, list(item.completions)):
                        raise InputError(
                            "is already used by a different item",
                            path=f"item {item.item_id!r}",
                            field="id",
                        )
                    continue
                position += 1
                added += 1
                existing[item.item_id] = (item.prompt, list(item.completions))
                session.add(
                    ItemRow(
                        project_id=row.id,
                        item_key=item.item_id,
                        position=position,
                        prompt=item.prompt,
                        completions=list(item.completions),
                        item_metadata=dict(item.metadata),
                        reserved_user_id=reserved_id,
                        created_at=now,
                    )
                )
            session.flush()
            return added

        return self.run(work)

    def items(self, project: ProjectRef) -> list[Item]:
        """Every item of the project, in the order added."""

        def work(session: Session) -> list[Item]:
            project_id = find_project(session, project).id
            query = (
                select(ItemRow).where(ItemRow.project_id == project_id).order_by(ItemRow.position)
            )
            return [item_record(row) for row in session.scalars(query)]

        return self.run(work)

    # ---- leases ------------------------------------------------------------------

    def _lease_record(
        self, session: Session, project: ProjectRow, item: ItemRow, user: UserRow, lease: LeaseRow
    ) -> Lease:
        return Lease(
            project_id=project.id,
            item=item_record(item),
            annotator=user.name,
            slot=lease.slot,
            display_order=tuple(lease.display_order),
            leased_at=lease.leased_at,
            expires_at=lease.expires_at,
            guideline_version=current_guideline_version(session, project.id),
        )

    def _take_slot(
        self, session: Session, project: ProjectRow, item: ItemRow, user: UserRow
    ) -> Lease:
        """Give ``user`` a free slot of ``item``, or take over an expired lease (compare-and-swap)."""
        now = time.time()
        order = random.sample(range(project.num_completions), project.num_completions)
        rows = session.scalars(select(LeaseRow).where(LeaseRow.item_id == item.id)).all()
        used = {row.slot for row in rows}
        free = [slot for slot in range(project.overlap) if slot not in used]
        expires = now + project.lease_seconds
        if free:
            lease = LeaseRow(
                item_id=item.id,
                slot=free[0],
                user_id=user.id,
                state=LEASE_OPEN,
                display_order=order,
                leased_at=now,
                expires_at=expires,
            )
            session.add(lease)
            session.flush()  # a unique violation here means we lost a race: retried
            return self._lease_record(session, project, item, user, lease)
        for stale in (r for r in rows if r.state == LEASE_OPEN and r.expires_at <= now):
            taken = session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.id == stale.id,
                    LeaseRow.user_id == stale.user_id,
                    LeaseRow.state == LEASE_OPEN,
                    LeaseRow.expires_at <= now,
                )
                .values(user_id=user.id, display_order=order, leased_at=now, expires_at=expires)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:
                lease = session.get(LeaseRow, stale.id, populate_existing=True)
                return self._lease_record(session, project, item, user, lease)
        raise db.RetryableConflict("no slot left after all")

    def _occupied(self, now: float):  # noqa: ANN202 - a correlated scalar subquery
        return (
            select(func.count(LeaseRow.id))
            .where(
                LeaseRow.item_id == ItemRow.id,
                or_(LeaseRow.state == LEASE_DONE, LeaseRow.expires_at > now),
            )
            .correlate(ItemRow)
            .scalar_subquery()
        )

    def _candidates(self, project: ProjectRow, user: UserRow, now: float) -> Select:
        occupied = self._occupied(now)
        mine = exists().where(LeaseRow.item_id == ItemRow.id, LeaseRow.user_id == user.id)
        skipped = exists().where(SkipRow.item_id == ItemRow.id, SkipRow.user_id == user.id)
        query = (
            select(ItemRow)
            .where(
                ItemRow.project_id == project.id,
                or_(ItemRow.reserved_user_id.is_(None), ItemRow.reserved_user_id == user.id),
                ~mine,
                ~skipped,
                occupied < project.overlap,
            )
            .order_by(occupied.desc(), ItemRow.position)
            .limit(1)
        )
        if self._postgres:  # concurrent annotators spread over items instead of queueing
            query = query.with_for_update(skip_locked=True, of=ItemRow)
        return query

    def lease_next(self, project: ProjectRef, annotator: str) -> Lease | None:
        """The annotator's open lease in this project, else a newly leased item, else None.

        Items that others already started come first, then the order they were added.
        """

        def work(session: Session) -> Lease | None:
            row = find_project(session, project)
            user = find_user(session, annotator)
            held = session.execute(
                select(LeaseRow, ItemRow)
                .join(ItemRow, LeaseRow.item_id == ItemRow.id)
                .where(ItemRow.project_id == row.id, LeaseRow.user_id == user.id)
                .where(LeaseRow.state == LEASE_OPEN)
                .order_by(LeaseRow.leased_at)
                .limit(1)
            ).first()
            if held is not None:
                lease, item = held
                lease.expires_at = max(lease.expires_at, time.time() + row.lease_seconds)
                session.flush()
                return self._lease_record(session, row, item, user, lease)
            item = session.scalars(self._candidates(row, user, time.time())).first()
            return None if item is None else self._take_slot(session, row, item, user)

        return self.run(work)

    def lease_item(self, project: ProjectRef, annotator: str, item_id: str) -> Lease:
        """Lease one given item (the AI judge and the simulated panel choose their items)."""

        def work(session: Session) -> Lease:
            row = find_project(session, project)
            user = find_user(session, annotator)
            item = find_item(session, row.id, item_id)
            if item.reserved_user_id not in (None, user.id):
                raise LeaseError(f"item {item_id!r} belongs to another user")
            mine = session.scalars(
                select(LeaseRow).where(LeaseRow.item_id == item.id, LeaseRow.user_id == user.id)
            ).first()
            if mine is not None and mine.state == LEASE_DONE:
                raise StoreError(f"{annotator!r} already judged item {item_id!r}")
            if mine is not None:
                return self._lease_record(session, row, item, user, mine)
            occupied = session.scalar(
                select(self._occupied(time.time())).where(ItemRow.id == item.id)
            )
            if occupied >= row.overlap:
                raise LeaseError(f"item {item_id!r} already has {row.overlap} annotators")
            return self._take_slot(session, row, item, user)

        return self.run(work)

    def skip(self, project: ProjectRef, annotator: str, item_id: str) -> None:
        """Give up a leased item; it is never offered to this annotator again."""

        def work(session: Session) -> None:
            row = find_project(session, project)
            user = find_user(session, annotator)
            item = find_item(session, row.id, item_id)
            mine = session.scalars(
                select(LeaseRow).where(
                    LeaseRow.item_id == item.id,
                    LeaseRow.user_id == user.id,
                    LeaseRow.state == LEASE_OPEN,
                )
            ).first()
            if mine is not None:
                session.delete(mine)
            already = select(SkipRow).where(SkipRow.item_id == item.id, SkipRow.user_id == user.id)
            if session.scalars(already).first() is None:
                session.add(SkipRow(item_id=item.id, user_id=user.id, created_at=time.time()))
            session.flush()

        self.run(work)

    # ---- judgments -----------------------------------------------------------------

    def submit_judgment(self, project: ProjectRef, annotator: str, judgment: Judgment) -> Judgment:
        """Store a judgment on an item the annotator holds a lease on; returns it as stored.

        Atomic: the lease turns ``done`` (compare-and-swap on its holder) in the same
        transaction that inserts the judgment. An empty ``display_order`` is filled
        from the lease and a zero ``created_at`` with the current time.
        """
        if judgment.annotator not in ("", annotator):
            raise InputError(f"is {judgment.annotator!r}, not {annotator!r}", field="annotator")

        def work(session: Session) -> Judgment:
            row = find_project(session, project)
            check_judgment(judgment, row.kind, row.num_completions)
            if not 1 <= judgment.guideline_version <= current_guideline_version(session, row.id):
                raise InputError(
                    "is not a version of this project's guidelines", field="guideline_version"
                )
            user = find_user(session, annotator)
            item = find_item(session, row.id, judgment.item_id)
            lease = session.scalars(
                select(LeaseRow).where(LeaseRow.item_id == item.id, LeaseRow.user_id == user.id)
            ).first()
            if lease is not None and lease.state == LEASE_DONE:
                raise StoreError(f"{annotator!r} already judged item {judgment.item_id!r}")
            if lease is None:
                raise LeaseError(f"{annotator!r} holds no lease on item {judgment.item_id!r}")
            closed = session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.id == lease.id,
                    LeaseRow.user_id == user.id,
                    LeaseRow.state == LEASE_OPEN,
                )
                .values(state=LEASE_DONE)
                .execution_options(synchronize_session=False)
            )
            if closed.rowcount != 1:
                raise db.RetryableConflict("lease changed hands")
            stored = dataclasses.replace(
                judgment,
                annotator=user.name,
                display_order=tuple(judgment.display_order or lease.display_order),
                created_at=judgment.created_at or time.time(),
            )
            session.add(
                JudgmentRow(
                    project_id=row.id,
                    item_id=item.id,
                    user_id=user.id,
                    kind=stored.kind,
                    ranking=None if stored.ranking is None else [list(g) for g in stored.ranking],
                    ratings=None
                    if stored.ratings is None
                    else {str(k): float(v) for k, v in stored.ratings.items()},
                    both_bad=stored.both_bad,
                    seconds=float(stored.seconds),
                    display_order=list(stored.display_order),
                    guideline_version=stored.guideline_version,
                    source=stored.source,
                    created_at=stored.created_at,
                    probability=stored.probability,
                )
            )
            session.flush()
            return stored

        return self.run(work)

    def judgments(self, project: ProjectRef, annotator: str | None = None) -> list[Judgment]:
        """Every judgment of the project (or of one annotator), oldest first."""

        def work(session: Session) -> list[Judgment]:
            project_id = find_project(session, project).id
            query = (
                select(JudgmentRow, ItemRow.item_key, UserRow.name)
                .join(ItemRow, JudgmentRow.item_id == ItemRow.id)
                .join(UserRow, JudgmentRow.user_id == UserRow.id)
                .where(JudgmentRow.project_id == project_id)
                .order_by(JudgmentRow.id)
            )
            if annotator is not None:
                query = query.where(UserRow.name == annotator)
            return [judgment_record(*row) for row in session.execute(query)]

        return self.run(work)

    def progress(self, project: ProjectRef) -> Progress:
        """Counts of items, judgments, completed items and open leases."""

        def work(session: Session) -> Progress:
            row = find_project(session, project)
            n_items = session.scalar(
                select(func.count(ItemRow.id)).where(ItemRow.project_id == row.id)
            )
            per_item = (
                select(func.count(JudgmentRow.id).label("n"))
                .where(JudgmentRow.project_id == row.id)
                .group_by(JudgmentRow.item_id)
                .subquery()
            )
            complete = session.scalar(select(func.count()).where(per_item.c.n >= row.overlap))
            open_leases = session.scalar(
                select(func.count(LeaseRow.id))
                .join(ItemRow, LeaseRow.item_id == ItemRow.id)
                .where(
                    ItemRow.project_id == row.id,
                    LeaseRow.state == LEASE_OPEN,
                    LeaseRow.expires_at > time.time(),
                )
            )
            by_annotator = dict(
                session.execute(
                    select(UserRow.name, func.count(JudgmentRow.id))
                    .join(UserRow, JudgmentRow.user_id == UserRow.id)
                    .where(JudgmentRow.project_id == row.id)
                    .group_by(UserRow.name)
                ).all()
            )
            return Progress(
                items=n_items or 0,
                judgments=sum(by_annotator.values()),
                complete_items=complete or 0,
                open_leases=open_leases or 0,
                by_annotator=by_annotator,
            )

        return self.run(work)
