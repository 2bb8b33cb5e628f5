"""Annotator pages: log in, read the guidelines, label leased items, see one's own judgments."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.responses import Response

from alignkit.errors import InputError
from alignkit.feedback.accounts import authenticate
from alignkit.feedback.guidelines import get_guidelines, render_guidelines
from alignkit.feedback.records import Judgment
from alignkit.feedback.store import Lease, ProjectInfo, UserInfo
from alignkit.feedback.web.rendering import render
from alignkit.feedback.web.security import (
    new_session,
    replace_session,
    require_csrf,
    require_user,
    session_of,
    store_of,
)

router = APIRouter()
CurrentUser = Annotated[UserInfo, Depends(require_user)]
CSRF = [Depends(require_csrf)]


def _safe_next(target: str | None) -> str:
    """Only same-site paths are followed after login (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


@router.get("/", include_in_schema=False)
def home(request: Request, user: CurrentUser) -> Response:
    """Projects to label or chat in, with the user's own progress."""
    store = store_of(request)
    rows = []
    for project in store.projects():
        progress = store.progress(project.id)
        rows.append(
            {
                "project": project,
                "progress": progress,
                "mine": progress.by_annotator.get(user.name, 0),
            }
        )
    return render(request, "home.html", user=user, rows=rows)


@router.get("/login", include_in_schema=False)
def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002
    """The login form."""
    return render(request, "login.html", user=None, next=_safe_next(next), error=None)


@router.post("/login", dependencies=CSRF)
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=500)] = "/",  # noqa: A002
) -> Response:
    """Check the password; on success start a new session (new nonce) and go on."""
    user = authenticate(store_of(request), username, password)
    if user is None:
        return render(
            request,
            "login.html",
            status_code=401,
            user=None,
            next=_safe_next(next),
            error="Wrong name or password.",
        )
    replace_session(request, new_session(user.id))
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", dependencies=CSRF)
def logout(request: Request) -> Response:
    """End the session."""
    replace_session(request, new_session(None))
    return RedirectResponse("/login", status_code=303)


def _item_project(request: Request, project_id: int) -> ProjectInfo:
    project = store_of(request).project(project_id)
    if project.mode != "items":
        raise HTTPException(status_code=404, detail="not a labeling project")
    return project


@router.get("/projects/{project_id}", include_in_schema=False)
def guidelines_page(request: Request, project_id: int, user: CurrentUser) -> Response:
    """The project's current guidelines, shown before labeling starts."""
    project = _item_project(request, project_id)
    guidelines = get_guidelines(store_of(request), project.id)
    return render(
        request,
        "guidelines.html",
        user=user,
        project=project,
        guidelines=guidelines,
        guidelines_html=render_guidelines(guidelines.markdown),
    )


@router.post("/projects/{project_id}/start", dependencies=CSRF)
def start_labeling(
    request: Request, project_id: int, user: CurrentUser, version: Annotated[int, Form(ge=1)]
) -> Response:
    """Record that the annotator read guideline ``version`` and start labeling."""
    project = _item_project(request, project_id)
    if version != project.guideline_version:  # changed while they were reading
        return RedirectResponse(f"/projects/{project.id}", status_code=303)
    session = dict(session_of(request))
    session["seen"] = {**session.get("seen", {}), str(project.id): version}
    replace_session(request, session)
    return RedirectResponse(f"/projects/{project.id}/label", status_code=303)


def _seen_version(request: Request, project_id: int) -> int:
    return int(session_of(request).get("seen", {}).get(str(project_id), 0))


@router.get("/projects/{project_id}/label", include_in_schema=False)
def label_page(request: Request, project_id: int, user: CurrentUser, notice: str = "") -> Response:
    """The annotator's leased item, completions in the lease's random display order."""
    project = _item_project(request, project_id)
    if _seen_version(request, project.id) != project.guideline_version:
        return RedirectResponse(f"/projects/{project.id}", status_code=303)
    store = store_of(request)
    lease = store.lease_next(project.id, user.name)
    done = store.progress(project.id).by_annotator.get(user.name, 0)
    if lease is None:
        return render(request, "label_done.html", user=user, project=project, done=done)
    shown = [
        (position, lease.item.completions[index])
        for position, index in enumerate(lease.display_order)
    ]
    return render(
        request,
        "label.html",
        user=user,
        project=project,
        lease=lease,
        shown=shown,
        done=done,
        notice=notice[:200],
    )


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def judgment_from_form(form: FormData, project: ProjectInfo, lease: Lease) -> Judgment:
    """Turn the label form (display positions) into a Judgment (stored completion indices)."""
    order = lease.display_order
    common = {
        "item_id": lease.item.item_id,
        "annotator": lease.annotator,
        "kind": project.kind,
        "display_order": order,
        "seconds": round(max(0.0, time.time() - lease.leased_at), 3),
        "guideline_version": _int(_field(form, "guideline_version"), "guideline_version"),
        "source": "human",
    }
    if project.kind == "pairwise":
        choice = _field(form, "choice").lower()
        rankings = {"a": ((order[0],), (order[1],)), "b": ((order[1],), (order[0],))}
        if choice in rankings:
            return Judgment(**common, ranking=rankings[choice])
        if choice in ("tie", "bad"):
            return Judgment(**common, ranking=((0, 1),), both_bad=choice == "bad")
        raise InputError("pick A, B, tie or both bad", field="choice")
    if project.kind == "ranking":
        groups: dict[int, list[int]] = {}
        for position, index in enumerate(order):
            rank = _int(_field(form, f"rank_{position}"), f"rank_{position}")
            groups.setdefault(rank, []).append(index)
        return Judgment(**common, ranking=tuple(tuple(sorted(groups[r])) for r in sorted(groups)))
    ratings = {}
    for position, index in enumerate(order):
        value = _field(form, f"rating_{position}")
        if project.kind == "thumbs":
            if value not in ("up", "down"):
                raise InputError(
                    "choose thumbs up or down for every completion", field=f"rating_{position}"
                )
            ratings[index] = 1.0 if value == "up" else 0.0
        else:
            ratings[index] = float(_int(value, f"rating_{position}"))
    return Judgment(**common, ratings=dict(sorted(ratings.items())))


def _int(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError("must be a whole number", field=field) from None


@router.post("/projects/{project_id}/label", dependencies=CSRF)
async def submit_label(request: Request, project_id: int, user: CurrentUser) -> Response:
    """Submit or skip the leased item, then show the next one."""
    form = await request.form()
    return await run_in_threadpool(_submit_label_sync, request, project_id, user, form)


def _submit_label_sync(
    request: Request, project_id: int, user: UserInfo, form: FormData
) -> Response:
    project = _item_project(request, project_id)
    store = store_of(request)
    item_id = _field(form, "item_id")
    back = f"/projects/{project.id}/label"
    if not item_id:
        raise InputError("is missing", field="item_id")
    try:
        if _field(form, "action") == "skip":
            store.skip(project.id, user.name, item_id)
            return RedirectResponse(back, status_code=303)
        lease = store.lease_item(project.id, user.name, item_id)
        store.submit_judgment(project.id, user.name, judgment_from_form(form, project, lease))
    except InputError as error:  # e.g. a double submit: show the next item with a notice
        return RedirectResponse(f"{back}?notice={quote(str(error))}", status_code=303)
    return RedirectResponse(back, status_code=303)


@router.get("/projects/{project_id}/mine", include_in_schema=False)
def my_judgments(request: Request, project_id: int, user: CurrentUser) -> Response:
    """The user's own judgments in a project (never anyone else's)."""
    store = store_of(request)
    project = store.project(project_id)
    judgments = store.judgments(project.id, annotator=user.name)
    return render(request, "mine.html", user=user, project=project, judgments=judgments[-200:])
