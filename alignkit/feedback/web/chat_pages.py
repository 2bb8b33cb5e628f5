"""Chat mode: talk to a served model (OpenAI-compatible endpoint) and rate its replies."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from alignkit.errors import InputError
from alignkit.feedback.chat_store import (
    PENDING,
    add_replies_to_rate,
    add_user_turn,
    chat_transcript,
    latest_chat_session,
    resolve_pending_turn,
)
from alignkit.feedback.store import ProjectInfo, UserInfo
from alignkit.feedback.web.label_pages import judgment_from_form
from alignkit.feedback.web.rendering import render
from alignkit.feedback.web.security import require_csrf, require_user, store_of

router = APIRouter(prefix="/chat")
CurrentUser = Annotated[UserInfo, Depends(require_user)]
CSRF = [Depends(require_csrf)]


def chat_client(request: Request):  # noqa: ANN201 - openai.OpenAI, imported lazily
    """The OpenAI client for the served model (``alignkit serve``), built once."""
    if request.app.state.serve_url is None:
        raise HTTPException(
            status_code=503, detail="chat needs --serve-url (an alignkit serve endpoint)"
        )
    if request.app.state.chat_client is None:
        from openai import OpenAI

        request.app.state.chat_client = OpenAI(
            base_url=request.app.state.serve_url, api_key="not-needed", timeout=120.0, max_retries=0
        )
    return request.app.state.chat_client


def _chat_project(request: Request, project_id: int) -> ProjectInfo:
    project = store_of(request).project(project_id)
    if project.mode != "chat":
        raise HTTPException(status_code=404, detail="not a chat project")
    return project


@router.get("/{project_id}", include_in_schema=False)
def chat_page(request: Request, project_id: int, user: CurrentUser, notice: str = "") -> Response:
    """The conversation, with the latest reply(ies) waiting for a rating."""
    store = store_of(request)
    project = _chat_project(request, project_id)
    session_id = latest_chat_session(store, project.id, user.name)
    turns = chat_transcript(store, session_id, user.name)
    pending = next((t for t in turns if t.role == PENDING), None)
    lease = store.lease_item(project.id, user.name, pending.item_id) if pending else None
    shown = []
    if lease is not None:
        shown = [
            (pos, lease.item.completions[index]) for pos, index in enumerate(lease.display_order)
        ]
    return render(
        request,
        "chat.html",
        user=user,
        project=project,
        turns=[t for t in turns if t.role != PENDING],
        lease=lease,
        shown=shown,
        notice=notice[:300],
    )


def _sample_replies(
    request: Request, project: ProjectInfo, conversation: list[dict[str, str]]
) -> tuple[str, list[str]]:
    from openai import OpenAIError

    client = chat_client(request)
    try:
        model = project.chat_model or client.models.list().data[0].id
        response = client.chat.completions.create(
            model=model,
            messages=conversation,
            n=project.num_completions,
            max_tokens=request.app.state.chat_max_tokens,
            temperature=1.0,
        )
    except (OpenAIError, IndexError) as error:
        raise HTTPException(
            status_code=502, detail=f"model server error: {type(error).__name__}"
        ) from None
    replies = [choice.message.content or "" for choice in response.choices]
    if len(replies) != project.num_completions:
        raise HTTPException(
            status_code=502, detail="model server returned the wrong number of replies"
        )
    return model, replies


@router.post("/{project_id}/send", dependencies=CSRF)
async def send_message(
    request: Request,
    project_id: int,
    user: CurrentUser,
    message: Annotated[str, Form(min_length=1, max_length=8000)],
) -> Response:
    """Add the user's message, sample reply(ies) from the served model, await a rating."""
    return await run_in_threadpool(_send_sync, request, project_id, user, message)


def _send_sync(request: Request, project_id: int, user: UserInfo, message: str) -> Response:
    store = store_of(request)
    project = _chat_project(request, project_id)
    session_id = latest_chat_session(store, project.id, user.name)
    try:
        conversation = add_user_turn(store, session_id, user.name, message.strip())
    except InputError as error:
        return RedirectResponse(f"/chat/{project.id}?notice={quote(str(error))}", status_code=303)
    model, replies = _sample_replies(request, project, conversation)
    add_replies_to_rate(store, project.id, session_id, user.name, conversation, replies, model)
    return RedirectResponse(f"/chat/{project.id}", status_code=303)


@router.post("/{project_id}/rate", dependencies=CSRF)
async def rate_reply(request: Request, project_id: int, user: CurrentUser) -> Response:
    """Store the rating as a judgment; the chosen reply continues the conversation."""
    form = await request.form()
    return await run_in_threadpool(_rate_sync, request, project_id, user, form)


def _rate_sync(request: Request, project_id: int, user: UserInfo, form) -> Response:  # noqa: ANN001
    store = store_of(request)
    project = _chat_project(request, project_id)
    session_id = latest_chat_session(store, project.id, user.name)
    item_id = str(form.get("item_id") or "")
    try:
        lease = store.lease_item(project.id, user.name, item_id)
        judgment = store.submit_judgment(
            project.id, user.name, judgment_from_form(form, project, lease)
        )
    except InputError as error:
        return RedirectResponse(f"/chat/{project.id}?notice={quote(str(error))}", status_code=303)
    winner = (
        judgment.ranking[0][0]
        if judgment.ranking and len(judgment.ranking) > 1
        else lease.display_order[0]
    )
    resolve_pending_turn(store, session_id, user.name, item_id, lease.item.completions[winner])
    return RedirectResponse(f"/chat/{project.id}", status_code=303)


@router.post("/{project_id}/new", dependencies=CSRF)
def new_conversation(request: Request, project_id: int, user: CurrentUser) -> Response:
    """Start a new conversation."""
    project = _chat_project(request, project_id)
    latest_chat_session(store_of(request), project.id, user.name, fresh=True)
    return RedirectResponse(f"/chat/{project.id}", status_code=303)
