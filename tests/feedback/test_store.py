"""The store: exact round-trips, the migration, immutability, leases, overlap, validation."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

import alignkit.feedback.store as store_module
from alignkit.errors import InputError
from alignkit.feedback.accounts import authenticate, ensure_user
from alignkit.feedback.guidelines import get_guidelines, render_guidelines, set_guidelines
from alignkit.feedback.records import Item, Judgment
from alignkit.feedback.store import LeaseError, Store, StoreError
from alignkit.feedback.validation import read_prompts_file

from .conftest import pairwise_items

CHAT_PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi ünïcode"},
]


def _judge(store: Store, project: str, annotator: str, judgment: Judgment) -> Judgment:
    store.lease_item(project, annotator, judgment.item_id)
    return store.submit_judgment(project, annotator, judgment)


@pytest.mark.parametrize(
    ("kind", "k", "verdict"),
    [
        ("pairwise", 2, {"ranking": ((0, 1),), "both_bad": True}),
        ("ranking", 3, {"ranking": ((2,), (0, 1))}),
        ("thumbs", 2, {"ratings": {0: 1.0, 1: 0.0}}),
        ("likert", 3, {"ratings": {0: 7.0, 1: 1.0, 2: 4.0}}),
    ],
)
def test_items_and_judgments_round_trip_exactly(
    store: Store, kind: str, k: int, verdict: dict
) -> None:
    items = [
        Item(
            "chat",
            CHAT_PROMPT,
            tuple(f"c{i}" for i in range(k)),
            {"source": "sample", "scores": [0.5] * k},
        ),
        Item("plain", "Why is the sky blue?", tuple(f"d{i}" for i in range(k))),
    ]
    store.create_project("p", kind, k, overlap=2)
    assert store.add_items("p", items) == 2
    assert store.add_items("p", items) == 0  # identical items are skipped
    assert store.items("p") == items
    ensure_user(store, "ann")
    judgment = Judgment(
        "chat",
        "ann",
        kind,
        seconds=12.345678,
        display_order=tuple(reversed(range(k))),
        created_at=1_700_000_123.456789,
        source="ai",
        probability=0.8125,
        **verdict,
    )
    assert _judge(store, "p", "ann", judgment) == judgment
    assert store.judgments("p") == [judgment]
    assert store.judgments("p", annotator="ann") == [judgment]
    assert store.judgments("p", annotator="nobody") == []


def test_schema_of_the_migration_matches_the_tables(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from alignkit.feedback.db import schema_revision
    from alignkit.feedback.tables import Base

    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert schema_revision(store.engine) == "0001"
    Store(store.url)  # migrating again is a no-op
    assert schema_revision(store.engine) == "0001"


def test_judgments_cannot_be_updated_or_deleted(store: Store) -> None:
    store.create_project("p", "pairwise", 2, overlap=1)
    store.add_items("p", pairwise_items(1))
    ensure_user(store, "ann")
    _judge(store, "p", "ann", Judgment("i0", "ann", "pairwise", ((0,), (1,))))
    for statement in ("UPDATE judgments SET seconds = 99", "DELETE FROM judgments"):
        with pytest.raises(Exception, match="immutable"), store.engine.begin() as connection:
            connection.execute(text(statement))
    assert len(store.judgments("p")) == 1
    with pytest.raises(StoreError, match="already judged"):
        store.submit_judgment("p", "ann", Judgment("i0", "ann", "pairwise", ((1,), (0,))))


def test_leases_respect_overlap_and_fill_started_items_first(store: Store) -> None:
    store.create_project("p", "pairwise", 2, overlap=2)
    store.add_items("p", pairwise_items(2))
    for name in ("a", "b", "c"):
        ensure_user(store, name)
    first = store.lease_next("p", "a")
    assert first.item.item_id == "i0" and sorted(first.display_order) == [0, 1]
    again = store.lease_next("p", "a")  # the held lease comes back, its expiry extended
    assert (again.item, again.slot, again.display_order) == (
        first.item,
        first.slot,
        first.display_order,
    )
    assert again.expires_at >= first.expires_at
    assert store.lease_next("p", "b").item.item_id == "i0"  # started items first
    assert store.lease_next("p", "c").item.item_id == "i1"  # i0 has 2 leases = overlap
    with pytest.raises(LeaseError, match="already has 2"):
        store.lease_item("p", "c", "i0")
    with pytest.raises(LeaseError, match="no lease"):
        store.submit_judgment("p", "c", Judgment("i0", "c", "pairwise", ((0,), (1,))))
    assert store.progress("p").open_leases == 3


def test_an_expired_lease_is_taken_over_and_its_holder_refused(store: Store, monkeypatch) -> None:
    store.create_project("p", "pairwise", 2, overlap=1, lease_seconds=60)
    store.add_items("p", pairwise_items(1))
    ensure_user(store, "a")
    ensure_user(store, "b")
    assert store.lease_next("p", "a").item.item_id == "i0"
    assert store.lease_next("p", "b") is None  # overlap 1 is taken
    real_time = store_module.time.time
    monkeypatch.setattr(store_module.time, "time", lambda: real_time() + 61)
    taken = store.lease_next("p", "b")
    assert taken.item.item_id == "i0" and taken.slot == 0
    with pytest.raises(LeaseError):
        store.submit_judgment("p", "a", Judgment("i0", "a", "pairwise", ((0,), (1,))))
    stored = store.submit_judgment("p", "b", Judgment("i0", "b", "pairwise", ((0,), (1,))))
    assert stored.display_order == taken.display_order  # filled from the lease
    assert [j.annotator for j in store.judgments("p")] == ["b"]


def test_skipped_items_are_not_offered_again(store: Store) -> None:
    store.create_project("p", "pairwise", 2, overlap=1)
    store.add_items("p", pairwise_items(2))
    ensure_user(store, "a")
    assert store.lease_next("p", "a").item.item_id == "i0"
    store.skip("p", "a", "i0")
    assert store.lease_next("p", "a").item.item_id == "i1"
    store.skip("p", "a", "i1")
    assert store.lease_next("p", "a") is None
    ensure_user(store, "b")
    assert store.lease_next("p", "b").item.item_id == "i0"  # the slot was freed


@pytest.mark.parametrize(
    ("kind", "k", "verdict", "field"),
    [
        ("pairwise", 2, {"ranking": ((0,), (0,))}, "ranking"),
        ("pairwise", 2, {"ranking": ((0,), (1,)), "both_bad": True}, "both_bad"),
        ("ranking", 3, {"ranking": ((0,), (1,))}, "ranking"),
        ("thumbs", 1, {"ratings": {0: 0.5}}, "ratings"),
        ("likert", 1, {"ratings": {0: 8.0}}, "ratings"),
        ("likert", 1, {"ratings": {0: 3.0}, "seconds": -1.0}, "seconds"),
    ],
)
def test_invalid_judgments_are_refused_with_the_field(store, kind, k, verdict, field) -> None:
    store.create_project("p", kind, k, overlap=1)
    store.add_items("p", [Item("x", "p", tuple("abc"[:k]))])
    ensure_user(store, "a")
    store.lease_item("p", "a", "x")
    with pytest.raises(InputError) as caught:
        store.submit_judgment("p", "a", Judgment("x", "a", kind, **verdict))
    assert caught.value.field == field
    assert store.judgments("p") == []


def test_guidelines_are_versioned_and_rendered_safely(store: Store) -> None:
    store.create_project("p", "pairwise", 2, guidelines="v1 text")
    assert set_guidelines(store, "p", "# Rules\n<script>alert(1)</script>") == 2
    assert get_guidelines(store, "p").version == 2
    assert get_guidelines(store, "p", 1).markdown == "v1 text"
    assert store.project("p").guideline_version == 2
    html = str(render_guidelines(get_guidelines(store, "p").markdown))
    assert "<h1>Rules</h1>" in html and "<script>" not in html


def test_passwords_are_argon2_and_checked(store: Store) -> None:
    from alignkit.feedback.accounts import add_user

    add_user(store, "ann", "annotator", "correct horse")
    with store.engine.connect() as connection:
        stored = connection.execute(text("SELECT password_hash FROM users")).scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert authenticate(store, "ann", "correct horse").name == "ann"
    assert authenticate(store, "ann", "wrong horse") is None
    assert authenticate(store, "nobody", "correct horse") is None


def test_prompt_file_errors_name_file_line_and_field(tmp_path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(
        '{"prompt": "a", "completions": ["x", "y"]}\n{"prompt": "b", "completions": ["x"]}\n'
    )
    with pytest.raises(InputError) as caught:
        read_prompts_file(path)
    assert (
        str(caught.value)
        == f"{path}:2: field 'completions' must have 2 completions for this project (got 1)"
    )
    path.write_text('{"prompt": [{"role": "robot", "content": "hi"}], "completions": ["x"]}\n')
    with pytest.raises(InputError, match=r":1: field 'prompt\[0\]' role must be one of"):
        read_prompts_file(path)
    path.write_text("not json\n")
    with pytest.raises(InputError, match=r"samples.jsonl:1: is not valid JSON"):
        read_prompts_file(path)
    path.write_text('{"prompt": "q", "completions": ["x", "y"], "id": 7, "extra": 1}\n')
    assert read_prompts_file(path) == [Item("7", "q", ("x", "y"), {"extra": 1})]


def test_prompt_file_rows_keep_unicode_line_separators(tmp_path) -> None:
    # sampled text holds U+2028 now and then; written raw it must not split its row
    row = {"prompt": "q", "completions": ["one\u2028two", "three\u0085four"], "id": "a"}
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert read_prompts_file(path) == [Item("a", "q", ("one\u2028two", "three\u0085four"), {})]
