"""The labeling app: ``create_app(store)`` wires sessions, limits, errors and the routers.

Pages are server-rendered (Jinja2) with a little vanilla JS for keyboard
shortcuts; ``/api/v1`` is a small JSON API over the same store calls.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import Response

from alignkit.errors import InputError
from alignkit.feedback.accounts import secret_key
from alignkit.feedback.store import LeaseError, NotFound, Store, StoreError
from alignkit.feedback.web import admin_pages, api, chat_pages, label_pages
from alignkit.feedback.web.rendering import STATIC_DIR, render
from alignkit.feedback.web.security import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    BodySizeLimit,
    LoginRequired,
    SessionCodec,
    new_session,
)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get(
        "accept", ""
    )


def _error_response(request: Request, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status)
    return render(request, "error.html", status_code=status, status=status, message=message)


def create_app(
    store: Store,
    *,
    serve_url: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    secure_cookies: bool = False,
    chat_max_tokens: int = 128,
) -> FastAPI:
    """The labeling app over ``store``; ``serve_url`` (``http://host:port/v1``) enables chat."""
    app = FastAPI(title="alignkit label", version="1", docs_url=None, redoc_url=None)
    app.state.store = store
    app.state.codec = SessionCodec(secret_key(store))
    app.state.serve_url = serve_url
    app.state.chat_max_tokens = chat_max_tokens
    app.state.chat_client = None  # built on first use (see chat_pages.chat_client)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def sessions_and_headers(request: Request, call_next):  # noqa: ANN202
        codec: SessionCodec = app.state.codec
        session = codec.load(request.cookies.get(SESSION_COOKIE))
        request.state.session_changed = session is None
        request.state.session = session if session is not None else new_session()
        response = await call_next(request)
        if request.state.session_changed:
            response.set_cookie(
                SESSION_COOKIE,
                codec.dump(request.state.session),
                max_age=SESSION_SECONDS,
                httponly=True,
                samesite="lax",
                secure=secure_cookies,
            )
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        return response

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _error: LoginRequired) -> Response:
        if request.method == "GET" and not _wants_json(request):
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return JSONResponse({"detail": "login required"}, status_code=401)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        response = _error_response(request, error.status_code, str(error.detail))
        for header, value in (error.headers or {}).items():
            response.headers[header] = value
        return response

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> Response:
        status = 400
        if isinstance(error, NotFound):
            status = 404
        elif isinstance(error, (LeaseError, StoreError)):
            status = 409
        return _error_response(request, status, str(error))

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.include_router(label_pages.router)
    app.include_router(admin_pages.router)
    app.include_router(chat_pages.router)
    app.include_router(api.router)
    return app
