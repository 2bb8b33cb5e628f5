"""Jinja2 templates of the labeling app and the helper every page renders through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from alignkit.feedback.web.security import current_user, session_of

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TEMPLATES = Jinja2Templates(directory=str(TEMPLATE_DIR))

KIND_LABELS = {
    "pairwise": "Pairwise A/B",
    "ranking": "Rank completions",
    "thumbs": "Thumbs up/down",
    "likert": "Likert 1-7",
}


def _prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as chat messages, for display (a plain string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _kappa_class(value: float | None) -> str:
    """The CSS class of a kappa heatmap cell: ``k0`` (<= 0, red) ... ``k10`` (1, green)."""
    if value is None or value != value:  # NaN
        return "k-na"
    return f"k{round(max(0.0, min(1.0, value)) * 10)}"


TEMPLATES.env.filters["messages"] = _prompt_messages
TEMPLATES.env.filters["kappa_class"] = _kappa_class
TEMPLATES.env.filters["tojson_compact"] = lambda value: json.dumps(value, ensure_ascii=False)
TEMPLATES.env.globals["KIND_LABELS"] = KIND_LABELS


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """Render ``name`` with the logged-in user and the CSRF token in the context."""
    if "user" not in context:
        context["user"] = current_user(request)
    context["csrf_token"] = request.app.state.codec.csrf_token(session_of(request))
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)
