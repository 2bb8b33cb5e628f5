"""Sessions, CSRF tokens, roles and request limits of the labeling app.

* The session is a cookie signed with itsdangerous (``HttpOnly``, ``SameSite=Lax``,
  12 h): ``{"uid": user id or None, "nonce": random, "seen": {project: version}}``.
  Every visitor gets one, so the login form is CSRF-protected as well.
* A CSRF token is an HMAC of the session nonce; every POST must carry it (form
  field ``csrf_token`` or header ``X-CSRF-Token``). Logging in renews the nonce.
* Passwords are argon2 hashes (:mod:`alignkit.feedback.accounts`).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from fastapi import Depends, HTTPException, Request
from itsdangerous import BadSignature, Signer, URLSafeTimedSerializer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignkit.feedback.accounts import get_user_by_id
from alignkit.feedback.store import Store, UserInfo

SESSION_COOKIE = "alignkit_session"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class LoginRequired(Exception):
    """Raised by :func:`require_user`; GET pages redirect to /login, the rest get 401."""


class SessionCodec:
    """Signs and reads session cookies and derives CSRF tokens from one secret."""

    def __init__(self, secret: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="alignkit-session")
        self._csrf = Signer(secret, salt="alignkit-csrf")

    def load(self, cookie: str | None) -> dict[str, Any] | None:
        """The session in a cookie, or None when missing, forged or too old."""
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=SESSION_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("nonce"), str):
            return None
        return data

    def dump(self, session: dict[str, Any]) -> str:
        """The signed cookie value of a session."""
        return self._serializer.dumps(session)

    def csrf_token(self, session: dict[str, Any]) -> str:
        """The CSRF token that goes with this session."""
        return self._csrf.get_signature(session["nonce"]).decode("ascii")

    def csrf_valid(self, session: dict[str, Any], token: str | None) -> bool:
        """True when ``token`` is this session's CSRF token (constant-time compare)."""
        return bool(token) and hmac.compare_digest(self.csrf_token(session), str(token))


def new_session(user_id: int | None = None) -> dict[str, Any]:
    """A fresh session with a new nonce (so old CSRF tokens stop working)."""
    return {"uid": user_id, "nonce": secrets.token_urlsafe(16), "seen": {}}


def session_of(request: Request) -> dict[str, Any]:
    """The request's session (set up by the app's session middleware)."""
    return request.state.session


def replace_session(request: Request, session: dict[str, Any]) -> None:
    """Make ``session`` the one written back in the response cookie."""
    request.state.session = session
    request.state.session_changed = True


def store_of(request: Request) -> Store:
    """The app's store."""
    return request.app.state.store


def current_user(request: Request) -> UserInfo | None:
    """The logged-in user, or None."""
    user_id = session_of(request).get("uid")
    if not isinstance(user_id, int):
        return None
    return get_user_by_id(store_of(request), user_id)


def require_user(request: Request) -> UserInfo:
    """Dependency: the logged-in user (anyone else: redirect or 401)."""
    user = current_user(request)
    if user is None:
        raise LoginRequired()
    return user


def require_admin(user: UserInfo = Depends(require_user)) -> UserInfo:  # noqa: B008
    """Dependency: the logged-in admin (annotators get 403)."""
    if user.role != "admin":
        raise HTTPException(status_code=403, detail="admins only")
    return user


async def require_csrf(request: Request) -> None:
    """Dependency for every state-changing route: a valid CSRF token or 403."""
    token = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if token is None and content_type.startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    codec: SessionCodec = request.app.state.codec
    if not codec.csrf_valid(session_of(request), token):
        raise HTTPException(status_code=403, detail="missing or invalid CSRF token")


class BodyTooLarge(HTTPException):
    """The request body passed the app's size limit (an HTTPException, so FastAPI's body
    parsing passes it on as a 413 instead of a generic 400)."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


class BodySizeLimit:
    """ASGI middleware: 413 for a declared or streamed body larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            await _plain_response(
                send, status, b"request body too large" if status == 413 else b"bad length"
            )
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _plain_response(send, 413, b"request body too large")


async def _plain_response(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
