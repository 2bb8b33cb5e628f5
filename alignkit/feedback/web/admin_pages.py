"""Admin pages: projects, items, guideline versions, users, statistics and exports."""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from alignkit.errors import InputError
from alignkit.feedback.accounts import add_user, list_users
from alignkit.feedback.agreement import AgreementReport
from alignkit.feedback.exporting import export_rows, project_report
from alignkit.feedback.guidelines import get_guidelines, set_guidelines
from alignkit.feedback.records import Item
from alignkit.feedback.store import UserInfo
from alignkit.feedback.validation import parse_prompt_lines
from alignkit.feedback.web.rendering import render
from alignkit.feedback.web.security import require_admin, require_csrf, store_of
from alignkit.jsonl import jsonl_lines

router = APIRouter(prefix="/admin")
Admin = Annotated[UserInfo, Depends(require_admin)]
CSRF = [Depends(require_csrf)]
NUM_COMPLETIONS_FOR_CHAT = {"thumbs": 1, "pairwise": 2}


async def _read_upload(upload: UploadFile | None, num_completions: int | None) -> list[Item]:
    if upload is None or not upload.filename:
        raise InputError("choose a JSONL file of prompts with completions", field="file")
    raw = await upload.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", path=upload.filename) from None
    return parse_prompt_lines(jsonl_lines(text), upload.filename, num_completions)


def _dashboard(
    request: Request, admin: UserInfo, error: str | None = None, status: int = 200
) -> Response:
    store = store_of(request)
    rows = [{"project": p, "progress": store.progress(p.id)} for p in store.projects()]
    return render(
        request,
        "admin.html",
        status_code=status,
        user=admin,
        rows=rows,
        users=list_users(store),
        error=error,
    )


@router.get("", include_in_schema=False)
def dashboard(request: Request, admin: Admin) -> Response:
    """Projects with progress, the new-project form, and users."""
    return _dashboard(request, admin)


@router.post("/projects", dependencies=CSRF)
async def create_project_form(
    request: Request,
    admin: Admin,
    name: Annotated[str, Form(min_length=1, max_length=100)],
    kind: Annotated[Literal["pairwise", "ranking", "thumbs", "likert"], Form()],
    overlap: Annotated[int, Form(ge=1, le=100)] = 3,
    lease_minutes: Annotated[int, Form(ge=1, le=24 * 60)] = 15,
    guidelines: Annotated[str, Form(max_length=100_000)] = "",
    mode: Annotated[Literal["items", "chat"], Form()] = "items",
    chat_model: Annotated[str, Form(max_length=200)] = "",
    file: Annotated[UploadFile | None, File()] = None,
) -> Response:
    """Create a project from an uploaded prompts file (or a chat project, without one)."""
    store = store_of(request)
    try:
        if mode == "chat":
            if kind not in NUM_COMPLETIONS_FOR_CHAT:
                raise InputError("chat projects rate with thumbs or pairwise", field="kind")
            project = store.create_project(
                name,
                kind,
                NUM_COMPLETIONS_FOR_CHAT[kind],
                1,
                guidelines,
                lease_minutes * 60,
                "chat",
                chat_model or None,
            )
        else:
            items = await _read_upload(file, 2 if kind == "pairwise" else None)
            project = store.create_project(
                name, kind, len(items[0].completions), overlap, guidelines, lease_minutes * 60
            )
            store.add_items(project.id, items)
    except InputError as error:
        return _dashboard(request, admin, error=str(error), status=400)
    return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)


@router.post("/users", dependencies=CSRF)
def create_user_form(
    request: Request,
    admin: Admin,
    username: Annotated[str, Form(min_length=1, max_length=64)],
    password: Annotated[str, Form(min_length=1, max_length=256)],
    role: Annotated[Literal["admin", "annotator"], Form()] = "annotator",
) -> Response:
    """Add a user who can log in."""
    try:
        add_user(store_of(request), username, role, password)
    except InputError as error:
        return _dashboard(request, admin, error=str(error), status=400)
    return RedirectResponse("/admin", status_code=303)


def _report_or_none(request: Request, project_id: int) -> tuple[AgreementReport | None, str | None]:
    try:
        return project_report(store_of(request), project_id), None
    except (InputError, ValueError, ZeroDivisionError) as error:
        return None, str(error)


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@router.get("/projects/{project_id}", include_in_schema=False)
def project_page(request: Request, project_id: int, admin: Admin, error: str = "") -> Response:
    """Progress, agreement statistics with a kappa heatmap, guidelines editor, exports."""
    store = store_of(request)
    project = store.project(project_id)
    report, report_error = _report_or_none(request, project.id)
    heatmaps = {}
    if report is not None:
        for family, matrix in report.kappa.items():
            heatmaps[family] = [[_clean(float(v)) for v in row] for row in matrix.tolist()]
    return render(
        request,
        "admin_project.html",
        user=admin,
        project=project,
        progress=store.progress(project.id),
        guidelines=get_guidelines(store, project.id),
        report=report,
        report_error=report_error,
        heatmaps=heatmaps,
        clean=_clean,
        judgments=store.judgments(project.id)[-100:][::-1],
        error=error[:300],
    )


@router.post("/projects/{project_id}/guidelines", dependencies=CSRF)
def edit_guidelines(
    request: Request,
    project_id: int,
    admin: Admin,
    markdown: Annotated[str, Form(max_length=100_000)],
) -> Response:
    """Save the guidelines as a new version (annotators are shown them again)."""
    store = store_of(request)
    project = store.project(project_id)
    set_guidelines(store, project.id, markdown, author=admin.name)
    return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)


@router.post("/projects/{project_id}/items", dependencies=CSRF)
async def add_items_form(
    request: Request, project_id: int, admin: Admin, file: Annotated[UploadFile, File()]
) -> Response:
    """Append items from another prompts file."""
    store = store_of(request)
    project = store.project(project_id)
    try:
        store.add_items(project.id, await _read_upload(file, project.num_completions))
    except InputError as error:
        return RedirectResponse(
            f"/admin/projects/{project.id}?error={quote(str(error))}", status_code=303
        )
    return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)


def _jsonl_download(rows: list[dict], filename: str) -> Response:
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Response(
        body,
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/projects/{project_id}/export")
def export_download(
    request: Request,
    project_id: int,
    admin: Admin,
    format: Literal["pairs", "unpaired"] = "pairs",  # noqa: A002
    ties: Literal["drop", "keep"] = "drop",
    aggregate: Literal["majority", "bt", "pl", "none"] = "majority",
    min_agreement: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
    exclude_flagged: bool = False,
    annotator: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Training data as JSONL (the same rows as ``alignkit label export``)."""
    store = store_of(request)
    project = store.project(project_id)
    rows = export_rows(
        store,
        project.id,
        format,
        ties,
        aggregate,
        min_agreement,
        exclude_flagged,
        annotator or None,
    )
    return _jsonl_download(rows, f"{project.name}-{format}.jsonl")


@router.get("/projects/{project_id}/judgments.jsonl")
def judgments_download(request: Request, project_id: int, admin: Admin) -> Response:
    """Every raw judgment of the project as JSONL."""
    from dataclasses import asdict

    store = store_of(request)
    project = store.project(project_id)
    rows = [asdict(j) for j in store.judgments(project.id)]
    for row in rows:
        if row["ratings"] is not None:
            row["ratings"] = {str(k): v for k, v in row["ratings"].items()}
    return _jsonl_download(rows, f"{project.name}-judgments.jsonl")


@router.get("/projects/{project_id}/stats.json")
def stats_json(request: Request, project_id: int, admin: Admin) -> dict:
    """The agreement report as JSON (NaN as null)."""
    project = store_of(request).project(project_id)
    report, report_error = _report_or_none(request, project.id)
    if report is None:
        return {"error": report_error}
    return report.to_dict()
