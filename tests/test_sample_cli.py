"""``alignkit sample`` end to end on the tiny model, and its one-line input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.tasks import get_task


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_a_task_with_gold_scores(tiny_model, tmp_path):
    out = tmp_path / "samples.jsonl"
    args = ["sample", f"model={tiny_model}", "task=sentiment", "limit=5", "k=3"]
    args += ["max_new_tokens=6", "batch_size=2", "reward=task:sentiment", f"output={out}"]
    assert run_cli(args) == 0
    rows = read_rows(out)
    assert [row["prompt"] for row in rows] == get_task("sentiment").prompts("eval")[:5]
    for row in rows:
        assert set(row) == {"prompt", "completions", "scores"}
        assert len(row["completions"]) == 3 and len(row["scores"]) == 3
        assert all(isinstance(c, str) for c in row["completions"])
        assert all(-1.0 <= s <= 1.0 for s in row["scores"])
    assert not (tmp_path / "samples.jsonl.partial").exists()
    # same seed, same file
    again = tmp_path / "again.jsonl"
    assert run_cli(args[:-1] + [f"output={again}"]) == 0
    assert again.read_text() == out.read_text()


def test_sample_a_prompts_file_with_chat_rows_and_resume(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": "Once upon a time"},
        {"prompt": [{"role": "user", "content": "Say hi."}]},
        {"prompt": "The weather today"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    args = [
        "sample",
        f"model={tiny_model}",
        f"data={prompts}",
        "k=2",
        "max_new_tokens=4",
        "batch_size=2",
        f"output={out}",
    ]
    assert run_cli(args) == 0
    rows = read_rows(out)
    assert [row["prompt"] for row in rows] == [r["prompt"] for r in records]
    assert all("scores" not in row for row in rows)
    # a run killed after its first batch resumes into the same file
    lines = out.read_text().splitlines()
    partial = tmp_path / "resumed.jsonl.partial"
    partial.write_text(lines[0] + "\n" + lines[1] + "\n" + '{"prompt": "torn')
    resumed = tmp_path / "resumed.jsonl"
    assert run_cli(args[:-1] + [f"output={resumed}", "--resume"]) == 0
    assert resumed.read_text() == out.read_text()
    # half a batch written: that batch is sampled again, not duplicated
    partial = tmp_path / "half.jsonl.partial"
    partial.write_text(lines[0] + "\n")
    half = tmp_path / "half.jsonl"
    assert run_cli(args[:-1] + [f"output={half}", "--resume"]) == 0
    assert half.read_text() == out.read_text()


def test_existing_output_needs_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    out.write_text("keep me\n")
    args = ["sample", f"model={tiny_model}", "limit=1", "k=1", "max_new_tokens=2", f"output={out}"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"alignkit: {out}: field 'output' exists; pass --overwrite to replace it"
    assert out.read_text() == "keep me\n"
    assert run_cli(args + ["--overwrite"]) == 0
    assert len(read_rows(out)) == 1


@pytest.mark.parametrize(
    "override,expected",
    [
        ("k=0", "field 'k' must be at least 1"),
        ("temperature=-1", "field 'temperature' must be >= 0"),
        ("top_p=1.5", "field 'top_p' must be in (0, 1]"),
        ("split=test", "field 'split' must be train or eval"),
        ("task=nope", "field 'task' unknown task 'nope'"),
        ("reward=./missing-rm", "field 'reward' reward model directory not found"),
        ("reward=no_such_module_xyz:f", "field 'reward' cannot import module"),
        ("model=./no-model-here", "model directory not found"),
        ("ensemble=median", "field 'ensemble' must be one of"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_model, tmp_path, capsys, override, expected):
    out = tmp_path / "samples.jsonl"
    args = ["sample", f"model={tiny_model}", "limit=1", f"output={out}", override]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignkit: ")
    assert expected in err
    assert not out.exists()


def test_bad_prompts_file_names_file_line_and_field(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    args = ["sample", f"model={tiny_model}", f"data={prompts}", f"output={tmp_path / 'o.jsonl'}"]
    assert run_cli(args) == 2
    assert capsys.readouterr().err.strip() == f"alignkit: {prompts}:2: field 'prompt' is missing"
    missing = tmp_path / "missing.jsonl"
    assert run_cli(args[:2] + [f"data={missing}", f"output={tmp_path / 'o.jsonl'}"]) == 2
    assert capsys.readouterr().err.strip() == f"alignkit: {missing}: file not found"
