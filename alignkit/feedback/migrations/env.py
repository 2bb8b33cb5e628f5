"""Alembic environment: runs on the connection that :func:`alignkit.feedback.db.migrate` hands over."""

from __future__ import annotations

from alembic import context

from alignkit.feedback.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through alignkit.feedback.db.migrate(engine)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
