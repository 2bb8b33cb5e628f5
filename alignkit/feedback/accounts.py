"""Users, passwords (argon2) and the server secret, stored through a :class:`Store`.

A user without a password cannot log in: simulated annotators and AI judges are
such users, and they judge through the same store calls as people.
"""

from __future__ import annotations

import re
import secrets
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.errors import InputError
from alignkit.feedback.store import Store, StoreError
from alignkit.feedback.store_records import UserInfo
from alignkit.feedback.tables import ROLES, SettingRow, UserRow

USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8
_passwords = PasswordHasher()
_UNUSABLE_HASH = _passwords.hash(secrets.token_hex(16))  # verified against for unknown users


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InputError(f"must be at least {MIN_PASSWORD_LENGTH} characters", field="password")


def _find(session: Session, name: str) -> UserRow | None:
    return session.scalars(select(UserRow).where(UserRow.name == name)).first()


def add_user(
    store: Store, name: str, role: str = "annotator", password: str | None = None
) -> UserInfo:
    """Create a user; without a password the user cannot log in."""
    if not USER_NAME.match(name):
        raise InputError("must be 1-64 letters, digits or _ . @ -", field="name")
    if role not in ROLES:
        raise InputError(f"must be one of {', '.join(ROLES)}", field="role")
    if password is not None:
        _check_password(password)
    password_hash = None if password is None else _passwords.hash(password)

    def work(session: Session) -> UserInfo:
        if _find(session, name) is not None:
            raise StoreError(f"user {name!r} already exists")
        row = UserRow(name=name, role=role, password_hash=password_hash, created_at=time.time())
        session.add(row)
        session.flush()
        return UserInfo(row.id, row.name, row.role)

    return store.run(work)


def ensure_user(store: Store, name: str, role: str = "annotator") -> UserInfo:
    """The user called ``name``, created without a password when missing."""
    found = get_user(store, name)
    if found is not None:
        return found
    try:
        return add_user(store, name, role)
    except StoreError:  # created meanwhile by another process
        return get_user(store, name)  # type: ignore[return-value]


def set_password(store: Store, name: str, password: str) -> None:
    """Replace a user's password."""
    _check_password(password)
    password_hash = _passwords.hash(password)

    def work(session: Session) -> None:
        row = _find(session, name)
        if row is None:
            raise StoreError(f"user {name!r} not found")
        row.password_hash = password_hash

    store.run(work)


def authenticate(store: Store, name: str, password: str) -> UserInfo | None:
    """The user when ``password`` matches, else None; unknown names cost the same time."""
    row = store.run(lambda session: _find(session, name))
    stored = row.password_hash if row is not None and row.password_hash else _UNUSABLE_HASH
    try:
        _passwords.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or not row.password_hash:
        return None
    return UserInfo(row.id, row.name, row.role)


def get_user(store: Store, name: str) -> UserInfo | None:
    """The user called ``name``, or None."""
    row = store.run(lambda session: _find(session, name))
    return None if row is None else UserInfo(row.id, row.name, row.role)


def get_user_by_id(store: Store, user_id: int) -> UserInfo | None:
    """The user with this id, or None."""
    row = store.run(lambda session: session.get(UserRow, user_id))
    return None if row is None else UserInfo(row.id, row.name, row.role)


def list_users(store: Store) -> list[UserInfo]:
    """Every user, by name."""
    rows = store.run(lambda session: session.scalars(select(UserRow).order_by(UserRow.name)).all())
    return [UserInfo(row.id, row.name, row.role) for row in rows]


def secret_key(store: Store) -> str:
    """The server's cookie-signing secret, created on first use and kept in the database."""

    def work(session: Session) -> str:
        row = session.get(SettingRow, "secret_key")
        if row is None:
            row = SettingRow(key="secret_key", value=secrets.token_urlsafe(48))
            session.add(row)
            session.flush()
        return row.value

    return store.run(work)
