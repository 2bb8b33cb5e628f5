"""``alignkit judge``: MT-Bench pairwise and grading with a local judge, and AI labels into the store."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.eval.mt_bench import (
    Question,
    conversation,
    insert_reference,
    pairwise_view,
    read_answers,
    read_questions,
)
from alignkit.feedback.judge import grading_prompt, pairwise_prompt

from .conftest import SHARED_DATA, write_jsonl

MT_BENCH = SHARED_DATA / "mt_bench_questions.jsonl"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def few_questions(tmp_path_factory) -> str:
    """Three MT-Bench questions: two writing ones and the first with reference answers."""
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines()]
    chosen = rows[:2] + [next(r for r in rows if r.get("reference"))]
    path = tmp_path_factory.mktemp("mt") / "questions.jsonl"
    return str(write_jsonl(path, chosen))


def test_read_the_real_mt_bench_file():
    questions = read_questions(MT_BENCH)
    assert len(questions) == 80
    assert len({q.category for q in questions}) == 8
    assert all(len(q.turns) == 2 for q in questions)
    assert any(q.reference for q in questions)
    assert len(read_questions(MT_BENCH, max_questions=5)) == 5


def test_conversation_views_and_reference_block():
    question = Question("7", "math", ("What is 2+2?", "And times 3?"), ("4", "12"))
    assert conversation(question, ["four", "twelve"], 2) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "And times 3?"},
    ]
    chat, response = pairwise_view(question, ["four", "twelve"], 2)
    assert chat == [{"role": "user", "content": "What is 2+2?"}]
    assert response == "four\n\nUser: And times 3?\n\nAssistant: twelve"
    text = insert_reference(grading_prompt(chat, "four"), chat, "4")
    assert (
        text.index("[Conversation]")
        < text.index("[Reference answer]\n4")
        < text.index("[Response]")
    )
    pair = insert_reference(pairwise_prompt("p", chat, "A-text", "B-text"), chat, "4")
    assert pair.index("[Reference answer]") < pair.index("[Response (A)]")
    assert insert_reference("unchanged", chat, None) == "unchanged"


def test_answer_files_both_formats(tmp_path, few_questions):
    questions = read_questions(few_questions)
    plain = write_jsonl(
        tmp_path / "a.jsonl",
        [{"question_id": q.question_id, "answer": ["one", "two"]} for q in questions],
    )
    assert read_answers(plain, questions, 2) == [["one", "two"]] * 3
    fastchat = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"question_id": int(q.question_id), "choices": [{"turns": ["x", "y"]}]}
            for q in questions
        ],
    )
    assert read_answers(fastchat, questions, 1) == [["x"]] * 3
    raw = tmp_path / "raw.jsonl"
    raw.write_text(
        "".join(
            json.dumps({"question_id": q.question_id, "answer": "a\u2028b"}, ensure_ascii=False)
            + "\n"
            for q in questions
        ),
        encoding="utf-8",
    )
    assert read_answers(raw, questions, 1) == [["a\u2028b"]] * 3
    one_turn = write_jsonl(
        tmp_path / "c.jsonl", [{"question_id": questions[0].question_id, "answer": "only"}]
    )
    with pytest.raises(Exception, match="has no answer"):
        read_answers(one_turn, questions, 1)


def test_pairwise_on_mt_bench_with_local_judge(tmp_path, capsys, tiny_model, few_questions):
    questions = read_questions(few_questions)
    answers_b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"question_id": q.question_id, "answer": ["I do not know.", "Still no idea."]}
            for q in questions
        ],
    )
    output = tmp_path / "pairwise.json"
    code, out, err = run_cli(
        [
            "judge", "pairwise", "--questions", few_questions, "--turns", "2",
            "--model-a", tiny_model, "--max-new-tokens", "12", "--name-a", "tiny",
            "--answers-b", str(answers_b), "--name-b", "shrug",
            "--judge-model", tiny_model, "--output", str(output),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "consistency" in out
    result = json.loads(output.read_text())
    summary = result["summary"]
    assert result["models"] == {"a": "tiny", "b": "shrug"} and result["turns"] == 2
    assert summary["n"] == 6 == summary["wins_a"] + summary["wins_b"] + summary["ties"]
    assert isinstance(summary["consistency_rate"], float)
    assert 0.0 <= summary["consistency_rate"] <= 1.0
    assert 0.0 <= summary["low"] <= summary["win_rate_a"] <= summary["high"] <= 1.0
    assert len(result["comparisons"]) == 6
    assert {(c["question_id"], c["turn"]) for c in result["comparisons"]} == {
        (q.question_id, t) for q in questions for t in (1, 2)
    }
    for c in result["comparisons"]:
        assert 0.0 <= c["p_a_a_shown_first"] <= 1.0 and 0.0 <= c["p_a_a_shown_second"] <= 1.0
        assert c["p_a"] == pytest.approx((c["p_a_a_shown_first"] + c["p_a_a_shown_second"]) / 2)
        assert c["winner"] in ("a", "b", "inconsistent")
    consistent = sum(c["winner"] != "inconsistent" for c in result["comparisons"])
    assert summary["consistency_rate"] == pytest.approx(consistent / 6)
    assert sum(v["n"] for v in result["by_category"].values()) == 6


def test_grade_on_mt_bench_with_local_judge(tmp_path, capsys, tiny_model, few_questions):
    questions = read_questions(few_questions)
    answers = write_jsonl(
        tmp_path / "a.jsonl", [{"question_id": q.question_id, "answer": "Four."} for q in questions]
    )
    output = tmp_path / "grades.json"
    code, out, err = run_cli(
        [
            "judge", "grade", "--questions", few_questions, "--answers", str(answers),
            "--judge-model", tiny_model, "--output", str(output),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["summary"]["n"] == 3 and result["summary"]["n_unparsed"] == 0
    for grade in result["grades"]:
        assert 1 <= grade["grade"] <= 10 and 1.0 <= grade["expected_grade"] <= 10.0
        assert sum(grade["probs"]) == pytest.approx(1.0)
    assert 1.0 <= result["summary"]["mean_expected_grade"] <= 10.0


def test_label_writes_ai_judgments_into_the_store(tmp_path, capsys, tiny_model):
    from alignkit.feedback.store import Store

    db = f"sqlite:///{tmp_path / 'label.db'}"
    items = write_jsonl(
        tmp_path / "items.jsonl",
        [
            {
                "prompt": f"Name a fruit ({i})",
                "completions": [f"apple {i}", f"stone {i}", f"pear {i}"],
            }
            for i in range(4)
        ],
    )
    code, _, err = run_cli(
        ["label", "--db", db, "create-project", "fruit", "--kind", "ranking",
         "--prompts", str(items), "--overlap", "2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    args = ["judge", "label", "--db", db, "--project", "fruit", "--judge-model", tiny_model]
    code, out, err = run_cli([*args, "--inconsistent", "tie"], capsys)
    assert code == 0, err
    assert "labeled 4 items" in out and "consistency" in out
    store = Store(db)
    judgments = store.judgments("fruit")
    assert len(judgments) == 4
    assert all(j.source == "ai" and j.annotator == "ai-judge" for j in judgments)
    assert all(
        j.kind == "ranking" and sorted(i for g in j.ranking for i in g) == [0, 1, 2]
        for j in judgments
    )
    assert all(0.0 <= j.probability <= 1.0 for j in judgments)
    # a second pass finds nothing left for this annotator
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "labeled 0 items" in out and "4 items already judged" in out
    assert len(store.judgments("fruit")) == 4


def test_label_refuses_likert_projects_and_unknown_ones(tmp_path, capsys, tiny_model):
    db = f"sqlite:///{tmp_path / 'label.db'}"
    items = write_jsonl(tmp_path / "items.jsonl", [{"prompt": "hi", "completions": ["a", "b"]}])
    run_cli(
        [
            "label",
            "--db",
            db,
            "create-project",
            "rate",
            "--kind",
            "likert",
            "--prompts",
            str(items),
        ],
        capsys,
    )
    for project, message in (("rate", "is likert"), ("missing", "not found")):
        code, _, err = run_cli(
            ["judge", "label", "--db", db, "--project", project, "--judge-model", tiny_model],
            capsys,
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --judge-model"),
        (["--judge-model", "J", "--openai-base-url", "http://x/v1"], "not both"),
        (["--judge-model", "J", "--turns", "3"], "fewer than 3 turns"),
        (["--judge-model", "J", "--model-a", "J"], "one of them"),
    ],
)
def test_pairwise_bad_input(extra, message, tmp_path, capsys, tiny_model, few_questions):
    extra = [tiny_model if x == "J" else x for x in extra]
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [{"question_id": q.question_id, "answer": "x"} for q in read_questions(few_questions)],
    )
    args = [
        "judge", "pairwise", "--questions", few_questions, "--answers-a", str(answers),
        "--answers-b", str(answers), "--output", str(tmp_path / "o.json"), *extra,
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
