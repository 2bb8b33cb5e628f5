"""JSON API over the same store calls as the pages (session cookie + ``X-CSRF-Token``).

Annotators see only their own judgments; statistics and other people's
judgments are for admins.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from alignkit.feedback.records import Judgment
from alignkit.feedback.store import UserInfo
from alignkit.feedback.web.security import require_csrf, require_user, store_of

router = APIRouter(prefix="/api/v1")
CurrentUser = Annotated[UserInfo, Depends(require_user)]
CSRF = [Depends(require_csrf)]


class MeOut(BaseModel):
    """Who is logged in."""

    name: str
    role: str


class ProjectOut(BaseModel):
    """A project as listed to users."""

    id: int
    name: str
    kind: str
    mode: str
    num_completions: int
    overlap: int
    guideline_version: int


class LeaseOut(BaseModel):
    """A leased item; ``completions`` are listed in display order."""

    item_id: str
    prompt: Any
    completions: list[str]
    display_order: list[int]
    guideline_version: int
    expires_at: float


class JudgmentIn(BaseModel):
    """A verdict on a leased item; completion indices are as stored (not as displayed)."""

    item_id: str = Field(min_length=1, max_length=128)
    ranking: list[list[Annotated[int, Field(ge=0, le=64)]]] | None = Field(
        default=None, max_length=64
    )
    ratings: dict[Annotated[int, Field(ge=0, le=64)], float] | None = Field(
        default=None, max_length=64
    )
    both_bad: bool = False
    guideline_version: int = Field(ge=1, le=1_000_000)


class JudgmentOut(BaseModel):
    """A stored judgment."""

    item_id: str
    annotator: str
    kind: Literal["pairwise", "ranking", "thumbs", "likert"]
    ranking: list[list[int]] | None
    ratings: dict[int, float] | None
    both_bad: bool
    seconds: float
    display_order: list[int]
    guideline_version: int
    source: str
    created_at: float


def _out(j: Judgment) -> JudgmentOut:
    return JudgmentOut(
        item_id=j.item_id,
        annotator=j.annotator,
        kind=j.kind,
        ranking=None if j.ranking is None else [list(g) for g in j.ranking],
        ratings=j.ratings,
        both_bad=j.both_bad,
        seconds=j.seconds,
        display_order=list(j.display_order),
        guideline_version=j.guideline_version,
        source=j.source,
        created_at=j.created_at,
    )


@router.get("/me")
def me(user: CurrentUser) -> MeOut:
    """The logged-in user."""
    return MeOut(name=user.name, role=user.role)


@router.get("/projects")
def list_projects(request: Request, user: CurrentUser) -> list[ProjectOut]:
    """Every project."""
    return [
        ProjectOut(
            id=p.id,
            name=p.name,
            kind=p.kind,
            mode=p.mode,
            num_completions=p.num_completions,
            overlap=p.overlap,
            guideline_version=p.guideline_version,
        )
        for p in store_of(request).projects()
    ]


@router.post(
    "/projects/{project_id}/lease",
    dependencies=CSRF,
    responses={204: {"description": "nothing left"}},
)
def lease_next(request: Request, project_id: int, user: CurrentUser) -> Any:
    """Lease the next item (or return the one already held); 204 when none is left."""
    lease = store_of(request).lease_next(project_id, user.name)
    if lease is None:
        return Response(status_code=204)
    return LeaseOut(
        item_id=lease.item.item_id,
        prompt=lease.item.prompt,
        completions=[lease.item.completions[i] for i in lease.display_order],
        display_order=list(lease.display_order),
        guideline_version=lease.guideline_version,
        expires_at=lease.expires_at,
    )


@router.post("/projects/{project_id}/judgments", dependencies=CSRF, status_code=201)
def submit(request: Request, project_id: int, body: JudgmentIn, user: CurrentUser) -> JudgmentOut:
    """Submit a judgment on an item the user holds a lease on (409 without one)."""
    store = store_of(request)
    project = store.project(project_id)
    lease = store.lease_item(project.id, user.name, body.item_id)
    judgment = Judgment(
        item_id=body.item_id,
        annotator=user.name,
        kind=project.kind,  # type: ignore[arg-type]
        ranking=None if body.ranking is None else tuple(tuple(g) for g in body.ranking),
        ratings=body.ratings,
        both_bad=body.both_bad,
        seconds=round(max(0.0, time.time() - lease.leased_at), 3),
        display_order=lease.display_order,
        guideline_version=body.guideline_version,
    )
    return _out(store.submit_judgment(project.id, user.name, judgment))


@router.get("/projects/{project_id}/judgments")
def list_judgments(
    request: Request,
    project_id: int,
    user: CurrentUser,
    annotator: Annotated[str | None, Query(max_length=64)] = None,
) -> list[JudgmentOut]:
    """Admins: every judgment (or one annotator's). Annotators: only their own."""
    if user.role != "admin":
        if annotator not in (None, user.name):
            raise HTTPException(status_code=403, detail="annotators see only their own judgments")
        annotator = user.name
    return [_out(j) for j in store_of(request).judgments(project_id, annotator)]
