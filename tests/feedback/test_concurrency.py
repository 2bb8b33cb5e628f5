"""32 concurrent annotators x 20 judgments: none lost, overlap never exceeded (SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import text

from alignkit.feedback.accounts import ensure_user
from alignkit.feedback.records import Judgment
from alignkit.feedback.store import Store

from .conftest import pairwise_items

ANNOTATORS = 32
PER_ANNOTATOR = 20
OVERLAP = 3


def _hammer(url: str) -> dict[str, int]:
    """Run the load; the ledger's counts afterwards (the per-annotator checks run here)."""
    store = Store(url)
    store.create_project("load", "pairwise", 2, overlap=OVERLAP)
    # Enough items that no schedule leaves an annotator without one: when an annotator
    # asks for its next item, the others hold at most 31 x 20 slots, so at most 206 items
    # are full without it, and it has judged at most 19: 225 items closed to it, and 227
    # (681 slots for 640 judgments) always leave it one. With fewer, a thread the
    # scheduler starves can find only items it judged, and lease_next rightly says None.
    others = (ANNOTATORS - 1) * PER_ANNOTATOR
    n_items = others // OVERLAP + PER_ANNOTATOR + 1
    store.add_items("load", pairwise_items(n_items))
    names = [f"ann{i:02d}" for i in range(ANNOTATORS)]
    for name in names:
        ensure_user(store, name)
    barrier = threading.Barrier(ANNOTATORS)
    errors: list[BaseException] = []
    submitted = Counter()

    def annotate(name: str) -> None:
        try:
            barrier.wait()
            for _ in range(PER_ANNOTATOR):
                lease = store.lease_next("load", name)
                assert lease is not None
                store.submit_judgment(
                    "load", name, Judgment(lease.item.item_id, name, "pairwise", ((0,), (1,)))
                )
                submitted[name] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=annotate, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    judgments = store.judgments("load")
    assert len(judgments) == ANNOTATORS * PER_ANNOTATOR == sum(submitted.values())
    assert Counter(j.annotator for j in judgments) == {name: PER_ANNOTATOR for name in names}
    per_item = Counter(j.item_id for j in judgments)
    assert max(per_item.values()) <= OVERLAP
    assert len({(j.item_id, j.annotator) for j in judgments}) == len(judgments)
    with store.engine.connect() as connection:  # the ledger agrees: done leases = judgments
        done = connection.execute(
            text("SELECT count(*) FROM leases WHERE state = 'done'")
        ).scalar_one()
        worst = connection.execute(
            text("SELECT max(c) FROM (SELECT count(*) c FROM leases GROUP BY item_id) s")
        ).scalar_one()
    store.close()
    return {"judgments": len(judgments), "done_leases": done, "most_leases_on_an_item": worst}


def test_concurrent_annotators_sqlite(sqlite_url: str) -> None:
    ledger = _hammer(sqlite_url)
    assert ledger["judgments"] == ledger["done_leases"] == ANNOTATORS * PER_ANNOTATOR
    assert ledger["most_leases_on_an_item"] <= OVERLAP


@pytest.mark.postgres
def test_concurrent_annotators_postgres(fresh_postgres_url: str) -> None:
    ledger = _hammer(fresh_postgres_url)
    assert ledger["judgments"] == ledger["done_leases"] == ANNOTATORS * PER_ANNOTATOR
    assert ledger["most_leases_on_an_item"] <= OVERLAP
