"""Database plumbing for the feedback store: engines, migrations, retried transactions.

SQLite (the default) runs in WAL mode and every transaction starts with
``BEGIN IMMEDIATE``, so writers queue on the database lock instead of failing
when a read transaction upgrades to a write. PostgreSQL runs at READ COMMITTED
with row locks (``FOR UPDATE SKIP LOCKED``) where the store needs them. On both,
unique constraints are the last line of defence and :func:`run_transaction`
retries a transaction that lost a race.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from alignkit.errors import InputError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DEFAULT_URL = "sqlite:///alignkit-label.db"
_ADVISORY_LOCK_KEY = 7_301_000_001  # PostgreSQL advisory lock held while migrating

T = TypeVar("T")


class RetryableConflict(Exception):
    """Raised inside a transaction to ask :func:`run_transaction` to try it again."""


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite (file, WAL, immediate transactions) or PostgreSQL."""
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise InputError(
                "use a file for SQLite (sqlite:///path.db); memory databases are not shared",
                path=url,
            )
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=40,
            max_overflow=0,
        )
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    if url.startswith(("postgresql", "postgres")):
        url = url.replace("postgres://", "postgresql://", 1)
        if url.startswith("postgresql://"):
            url = "postgresql+" + _postgres_driver() + url[len("postgresql") :]
        return create_engine(url, pool_size=40, max_overflow=10, pool_pre_ping=True)
    raise InputError("unsupported database URL (use sqlite:///FILE or postgresql://...)", path=url)


def _postgres_driver() -> str:
    """psycopg (3) when installed, else psycopg2 (the ``postgres`` extra)."""
    import importlib.util

    return "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"


def _configure_sqlite_connection(dbapi_connection, _record) -> None:  # noqa: ANN001
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _begin_immediate(connection) -> None:  # noqa: ANN001
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgres(engine: Engine) -> bool:
    """True when ``engine`` talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration shipped inside the package (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if is_postgres(engine):
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def schema_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _is_conflict(error: DBAPIError) -> bool:
    """A lost race worth retrying: a unique violation, a lock timeout, a serialization failure."""
    if isinstance(error, IntegrityError):
        return True
    message = str(error.orig).lower() if error.orig is not None else str(error).lower()
    markers = ("database is locked", "deadlock", "could not serialize", "lock timeout")
    return isinstance(error, OperationalError) and any(m in message for m in markers)


def run_transaction(
    sessions: sessionmaker[Session], work: Callable[[Session], T], attempts: int = 30
) -> T:
    """Run ``work(session)`` in one transaction, retrying it when it loses a race."""
    for attempt in range(attempts):
        session = sessions()
        try:
            with session.begin():
                return work(session)
        except RetryableConflict:
            pass
        except DBAPIError as error:
            if not _is_conflict(error) or attempt == attempts - 1:
                raise
        finally:
            session.close()
        time.sleep(random.uniform(0, 0.005 * (attempt + 1)))
    raise RetryableConflict(f"gave up after {attempts} attempts")
