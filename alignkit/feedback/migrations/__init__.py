"""Alembic migrations of the feedback store, run by :func:`alignkit.feedback.db.migrate`."""
