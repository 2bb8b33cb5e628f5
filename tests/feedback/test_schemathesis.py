"""Fuzz the labeling app from its OpenAPI schema: malformed requests get 4xx, never 500."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from alignkit.feedback.accounts import add_user
from alignkit.feedback.records import Item
from alignkit.feedback.store import Store
from alignkit.feedback.web.app import create_app

from .conftest import PASSWORDS, login


def _fuzz_target():
    """The app with a project of each kind (built at import: schemathesis needs the schema then)."""
    folder = tempfile.mkdtemp(prefix="alignkit-fuzz-")
    atexit.register(shutil.rmtree, folder, True)
    store = Store(f"sqlite:///{Path(folder) / 'fuzz.db'}")
    add_user(store, "admin", "admin", PASSWORDS["admin"])
    add_user(store, "ann", "annotator", PASSWORDS["ann"])
    for kind, k in (("pairwise", 2), ("ranking", 3), ("thumbs", 1), ("likert", 2)):
        store.create_project(kind, kind, k, overlap=2)
        store.add_items(kind, [Item(f"{kind}{i}", "q", tuple("abc"[:k])) for i in range(3)])
    return create_app(store, max_body_bytes=256 * 1024)


APP = _fuzz_target()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
_sessions: dict[str, dict[str, str]] = {}


def _headers(name: str) -> dict[str, str]:
    if name not in _sessions:
        client = TestClient(APP)
        token = login(client, name)
        _sessions[name] = {
            "Cookie": f"alignkit_session={client.cookies.get('alignkit_session')}",
            "X-CSRF-Token": token,
        }
    return _sessions[name]


def test_schema_lists_the_json_api() -> None:
    paths = set(APP.openapi()["paths"])
    assert {
        "/api/v1/projects/{project_id}/judgments",
        "/api/v1/projects/{project_id}/lease",
        "/login",
    } <= paths


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case) -> None:
    from schemathesis.checks import not_a_server_error

    for headers in (None, _headers("ann"), _headers("admin")):
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500
