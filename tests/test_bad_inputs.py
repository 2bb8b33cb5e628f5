"""The bad-input corpus: every broken input gives one line naming file, line and field
(or key), exit status 2, no traceback, and changes no existing file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30
    assert len({case["name"] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_bad_input_is_one_line_exit_2(case, tiny_model, tmp_path, capsys, monkeypatch):
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    args = [a.format(dir=corpus, model=tiny_model, out=out) for a in case["args"]]
    if not case.get("no_model"):
        args.append(f"model={tiny_model}")
    if not case.get("no_out"):
        args.append(f"output_dir={out}")
    code, err = _run(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert case["expect"] in lines[0], lines[0]
    assert _snapshot(tmp_path) == before
    assert not out.exists()


def test_truncated_checkpoint_is_reported_not_loaded(tiny_model, tmp_path, capsys):
    data = CORPUS / "good_sft.jsonl"
    out = tmp_path / "run"
    args = [
        "sft",
        f"model={tiny_model}",
        f"data={data}",
        f"output_dir={out}",
        "max_steps=3",
        "save_steps=1",
        "batch_size=1",
    ]
    code, _ = _run(args, capsys)
    assert code == 0
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a kill mid-copy, or a bad disk
    before = _snapshot(out)
    code, err = _run([*args, "--resume"], capsys)
    assert code == 2
    assert f"{checkpoint}: checkpoint is unreadable" in err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before
