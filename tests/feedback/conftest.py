"""Fixtures of the feedback tests: stores, logged-in clients, a PostgreSQL server, uvicorn."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignkit.feedback.accounts import add_user
from alignkit.feedback.records import Item
from alignkit.feedback.store import Store

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
PASSWORDS = {"admin": "admin-pass-1", "ann": "ann-pass-12", "bob": "bob-pass-12"}


def require_system_tool(path: str, what: str) -> None:
    """Fail in CI (CI=true) when a system tool is missing; skip with the reason elsewhere."""
    if shutil.which(path) or Path(path).exists():
        return
    message = f"{what} is missing ({path}); run scripts/install-system-deps.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pairwise_items(n: int, prefix: str = "i") -> list[Item]:
    return [
        Item(f"{prefix}{i}", f"Prompt number {i}?", (f"short {i}", f"a longer answer {i}"))
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch) -> None:
    """Cheap argon2 parameters in tests (the real ones cost ~0.1 s per hash on 2 cores)."""
    from argon2 import PasswordHasher

    import alignkit.feedback.accounts as accounts

    monkeypatch.setattr(
        accounts, "_passwords", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'label.db'}"


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    instance = Store(sqlite_url)
    yield instance
    instance.close()


@pytest.fixture
def people(store: Store) -> Store:
    """The store with an admin and two annotators who can log in."""
    add_user(store, "admin", "admin", PASSWORDS["admin"])
    add_user(store, "ann", "annotator", PASSWORDS["ann"])
    add_user(store, "bob", "annotator", PASSWORDS["bob"])
    return store


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


def login(client, name: str) -> str:  # noqa: ANN001 - a TestClient
    """Log ``name`` in through the form; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login",
        data={"username": name, "password": PASSWORDS[name], "csrf_token": token},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/").text)


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:  # noqa: ANN001 - an ASGI app
    """Serve ``app`` with uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl as user postgres) on a free loopback port."""
    initdb = _pg_bin("initdb")
    require_system_tool(initdb, "PostgreSQL (Debian package postgresql)")
    pg_ctl = _pg_bin("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix="alignkit-pg-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        [
            *as_postgres,
            initdb,
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=120 -c fsync=off"
    )
    subprocess.run(
        [
            *as_postgres,
            pg_ctl,
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(base / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new empty database on the session's PostgreSQL server."""
    import sqlalchemy

    name = f"t{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    admin = sqlalchemy.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg2://"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
