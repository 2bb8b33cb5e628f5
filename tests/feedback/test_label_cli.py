"""``alignkit label``: init, add-user, create-project, simulate, stats, export on tiny data."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.feedback.store import Store


def run(
    args: list[str], capsys, stdin: str | None = None, monkeypatch=None
) -> tuple[int, str, str]:  # noqa: ANN001
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def _prompts(path: Path, n: int = 12, k: int = 2) -> Path:
    rows = [
        {"prompt": f"Question {i}?", "completions": ["x" * (j + 1) * (i % 3 + 1) for j in range(k)]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_label_workflow_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    code, out, _ = run(["label", "--db", db, "init"], capsys)
    assert code == 0 and "schema 0001" in out
    code, out, _ = run(
        ["label", "--db", db, "add-user", "boss", "--role", "admin", "--password-stdin"],
        capsys,
        "boss-pass-1\n",
        monkeypatch,
    )
    assert code == 0 and out.strip() == "added admin 'boss'"
    guidelines = tmp_path / "rules.md"
    guidelines.write_text("# Prefer longer answers")
    code, out, _ = run(
        [
            "label",
            "--db",
            db,
            "create-project",
            "len",
            "--kind",
            "pairwise",
            "--prompts",
            str(_prompts(tmp_path / "s.jsonl")),
            "--overlap",
            "3",
            "--guidelines",
            str(guidelines),
        ],
        capsys,
    )
    assert code == 0 and "with 12 items" in out
    code, out, _ = run(
        ["label", "--db", db, "simulate", "len", "--annotators", "5", "--temperature", "0.1"],
        capsys,
    )
    assert code == 0 and out.startswith(
        "stored 36 simulated judgments from 5 annotators (0 refused"
    )
    store = Store(db)
    judgments = store.judgments("len")
    assert len(judgments) == 36 and {j.source for j in judgments} == {"simulated"}
    longer_wins = sum(j.ranking == ((1,), (0,)) for j in judgments)
    assert longer_wins >= 30  # low noise: the longer completion nearly always wins

    code, out, _ = run(["label", "--db", db, "stats", "len"], capsys)
    assert (
        code == 0
        and "12 items, 36 judgments, 12 complete" in out
        and "krippendorff_alpha[pairwise" in out
    )
    code, out, _ = run(["label", "--db", db, "stats", "len", "--json"], capsys)
    assert json.loads(out)["n_judgments"] == 36

    pairs = tmp_path / "pairs.jsonl"
    code, out, _ = run(
        ["label", "--db", db, "export", "len", "--out", str(pairs), "--format", "pairs"], capsys
    )
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert code == 0 and out.startswith(f"wrote {len(rows)} pairs rows")
    assert 10 <= len(rows) <= 12 and set(rows[0]) == {"prompt", "chosen", "rejected", "margin"}
    assert sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) >= len(rows) - 1
    code, _, _ = run(
        [
            "label",
            "--db",
            db,
            "export",
            "len",
            "--out",
            str(pairs),
            "--aggregate",
            "bt",
            "--ties",
            "keep",
        ],
        capsys,
    )
    assert (
        code == 0 and len(pairs.read_text().splitlines()) == 12
    )  # BT decides every item (ties kept)
    code, _, _ = run(
        [
            "label",
            "--db",
            db,
            "export",
            "len",
            "--out",
            str(pairs),
            "--annotator",
            "sim-00",
            "--aggregate",
            "none",
        ],
        capsys,
    )
    assert code == 0 and len(pairs.read_text().splitlines()) == sum(
        j.annotator == "sim-00" for j in judgments
    )


def test_bad_input_is_one_line_with_exit_2(tmp_path: Path, capsys) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completions": ["x", "y"]}\n{"prompt": "b"}\n')
    code, _, err = run(["label", "--db", db, "create-project", "p", "--prompts", str(bad)], capsys)
    assert code == 2 and err == f"alignkit: {bad}:2: field 'completions' is missing\n"
    code, _, err = run(["label", "--db", db, "stats", "missing"], capsys)
    assert code == 2 and err == "alignkit: project 'missing' not found\n"
    code, _, err = run(["label", "--db", "mysql://x", "init"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unsupported database URL" in err
    _prompts(bad, k=3)
    code, _, err = run(
        ["label", "--db", db, "create-project", "p", "--kind", "pairwise", "--prompts", str(bad)],
        capsys,
    )
    assert code == 2 and ":1: field 'completions' must have 2 completions" in err
