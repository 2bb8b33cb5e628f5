"""Roles, CSRF, sessions and limits of the labeling app, request by request."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from alignkit.feedback.records import Judgment
from alignkit.feedback.store import Store
from alignkit.feedback.web.app import create_app

from .conftest import csrf_of, login, pairwise_items

ANON, ANN, ADMIN = "anonymous", "ann", "admin"

# (method, url, {role: expected status}); anonymous page visits redirect to /login (303).
ACCESS_TABLE = [
    ("GET", "/", {ANON: 303, ANN: 200, ADMIN: 200}),
    ("GET", "/projects/1", {ANON: 303, ANN: 200, ADMIN: 200}),
    ("GET", "/projects/1/mine", {ANON: 303, ANN: 200, ADMIN: 200}),
    ("GET", "/admin", {ANON: 303, ANN: 403, ADMIN: 200}),
    ("GET", "/admin/projects/1", {ANON: 303, ANN: 403, ADMIN: 200}),
    ("GET", "/admin/projects/1/export?format=pairs", {ANON: 303, ANN: 403, ADMIN: 200}),
    ("GET", "/admin/projects/1/export?annotator=bob", {ANON: 303, ANN: 403, ADMIN: 200}),
    ("GET", "/admin/projects/1/judgments.jsonl", {ANON: 303, ANN: 403, ADMIN: 200}),
    ("GET", "/admin/projects/1/stats.json", {ANON: 303, ANN: 403, ADMIN: 200}),
    ("GET", "/api/v1/me", {ANON: 401, ANN: 200, ADMIN: 200}),
    ("GET", "/api/v1/projects/1/judgments", {ANON: 401, ANN: 200, ADMIN: 200}),
    ("GET", "/api/v1/projects/1/judgments?annotator=bob", {ANON: 401, ANN: 403, ADMIN: 200}),
    ("GET", "/api/v1/projects/1/judgments?annotator=ann", {ANON: 401, ANN: 200, ADMIN: 200}),
    ("GET", "/api/v1/projects/99/judgments", {ANON: 401, ANN: 404, ADMIN: 404}),
    ("POST", "/admin/users", {ANON: 401, ANN: 403, ADMIN: 303}),
    ("POST", "/admin/projects/1/guidelines", {ANON: 401, ANN: 403, ADMIN: 303}),
    ("POST", "/api/v1/projects/1/lease", {ANON: 401, ANN: 200, ADMIN: 200}),
]


@pytest.fixture
def app_store(people: Store) -> Store:
    people.create_project("p", "pairwise", 2, overlap=3, guidelines="Be fair.")
    people.add_items("p", pairwise_items(4))
    for name, item in (("ann", "i0"), ("bob", "i1")):
        people.lease_item("p", name, item)
        people.submit_judgment("p", name, Judgment(item, name, "pairwise", ((0,), (1,))))
    return people


@pytest.fixture
def clients(app_store: Store) -> dict[str, tuple[TestClient, str]]:
    app = create_app(app_store, max_body_bytes=64 * 1024)
    made = {}
    for role in (ANON, ANN, ADMIN):
        client = TestClient(app)
        token = login(client, role) if role != ANON else csrf_of(client.get("/login").text)
        made[role] = (client, token)
    return made


def _form_for(url: str) -> dict[str, str]:
    if url.endswith("/users"):
        return {"username": "newbie", "password": "newbie-pass", "role": "annotator"}
    if url.endswith("/guidelines"):
        return {"markdown": "New rules"}
    return {}


def test_access_table(clients) -> None:
    checked = 0
    for method, url, expected in ACCESS_TABLE:
        checked += _check_row(clients, method, url, expected)
    assert checked == 3 * len(ACCESS_TABLE)


def _check_row(clients, method: str, url: str, expected: dict[str, int]) -> int:
    for role, status in expected.items():
        client, token = clients[role]
        if method == "GET":
            response = client.get(url, follow_redirects=False)
        else:
            response = client.post(
                url, data=_form_for(url), headers={"X-CSRF-Token": token}, follow_redirects=False
            )
        assert response.status_code == status, (role, method, url, response.text[:200])
        if status == 303 and role == ANON:
            assert response.headers["location"].startswith("/login?next=")
    return len(expected)


def test_annotators_see_only_their_own_judgments(clients) -> None:
    client, _ = clients[ANN]
    rows = client.get("/api/v1/projects/1/judgments").json()
    assert [(r["annotator"], r["item_id"]) for r in rows] == [("ann", "i0")]
    page = client.get("/projects/1/mine").text
    # the table's item cells (a bare "i1" could be part of the page's random CSRF token)
    assert re.findall(r"<td><code>([^<]*)</code></td>", page) == ["i0"]
    assert "bob" not in re.sub(r'name="csrf_token" value="[^"]*"', "", page)
    admin, _ = clients[ADMIN]
    assert len(admin.get("/api/v1/projects/1/judgments").json()) == 2


def test_every_state_change_needs_the_sessions_csrf_token(clients) -> None:
    client, token = clients[ANN]
    other_token = clients[ADMIN][1]
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": other_token}):
        assert client.post("/api/v1/projects/1/lease", headers=headers).status_code == 403
        assert client.post("/logout", headers=headers, follow_redirects=False).status_code == 403
    assert (
        client.post("/api/v1/projects/1/lease", headers={"X-CSRF-Token": token}).status_code == 200
    )
    anonymous = TestClient(clients[ANON][0].app)
    anonymous.get("/login")
    login_without_token = anonymous.post(
        "/login", data={"username": "ann", "password": "ann-pass-12"}
    )
    assert login_without_token.status_code == 403


def test_sessions_are_signed_and_http_only(app_store: Store) -> None:
    client = TestClient(create_app(app_store))
    login(client, ANN)
    cookie = client.cookies.get("alignkit_session")
    forged = TestClient(client.app)
    forged.cookies.set(
        "alignkit_session", cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB")
    )
    assert forged.get("/", follow_redirects=False).status_code == 303
    fresh = TestClient(client.app).get("/login")
    set_cookie = fresh.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    assert "script-src 'self'" in fresh.headers["content-security-policy"]
    assert fresh.headers["x-frame-options"] == "DENY"


def test_wrong_password_and_open_redirects_are_refused(app_store: Store) -> None:
    client = TestClient(create_app(app_store))
    token = csrf_of(client.get("/login").text)
    wrong = client.post(
        "/login", data={"username": "ann", "password": "nope-nope", "csrf_token": token}
    )
    assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
    ok = client.post(
        "/login",
        data={
            "username": "ann",
            "password": "ann-pass-12",
            "csrf_token": token,
            "next": "//evil.example/x",
        },
        follow_redirects=False,
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/"


def test_large_requests_get_413(clients) -> None:
    client, token = clients[ANN]
    big = b"x" * (64 * 1024 + 1)
    declared = client.post(
        "/api/v1/projects/1/judgments", content=big, headers={"X-CSRF-Token": token}
    )
    assert declared.status_code == 413

    def chunks():
        for _ in range(70):
            yield b"y" * 1024

    streamed = client.post(
        "/api/v1/projects/1/judgments",
        content=chunks(),
        headers={"X-CSRF-Token": token, "content-type": "application/json"},
    )
    assert streamed.status_code == 413


def test_malformed_requests_get_4xx(clients) -> None:
    client, token = clients[ANN]
    headers = {"X-CSRF-Token": token}
    assert (
        client.post(
            "/api/v1/projects/1/judgments",
            content=b"{not json",
            headers={**headers, "content-type": "application/json"},
        ).status_code
        == 422
    )
    bad = client.post(
        "/api/v1/projects/1/judgments",
        json={"item_id": "i2", "ranking": [[0, 0]], "guideline_version": 1},
        headers=headers,
    )
    assert bad.status_code == 400 and "ranking" in bad.json()["detail"]
    assert (
        client.post(
            "/api/v1/projects/1/judgments",
            json={"item_id": "nope", "guideline_version": 1},
            headers=headers,
        ).status_code
        == 404
    )
    assert client.get("/projects/not-a-number").status_code == 422
    assert client.get("/no/such/page").status_code == 404
