"""The command line end to end: help, runs, bad input (exit 2, one line), overwrite, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main

from .conftest import write_jsonl


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_lists_commands_and_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for key in (
        "model=",
        "data=",
        "output_dir=",
        "max_steps=",
        "batch_size=",
        "max_length=",
        "lr=",
        "save_steps=",
        "seed=",
        "beta=0.1",
        "loss=dpo",
        "lora.r=",
    ):
        assert key in out, key
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "sft" in out and "reward" in out and "dpo" in out


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [
                {"prompt": "a", "chosen": "x", "rejected": "y"},
                {"prompt": "b", "chosen": "", "rejected": "y"},
            ],
            "prefs.jsonl:2: field 'chosen' is empty",
        ),
        (
            [{"prompt": "a", "chosen": "same", "rejected": "same"}],
            "prefs.jsonl:1: field 'rejected'",
        ),
        ([{"prompt": "a", "chosen": 3, "rejected": "y"}], "prefs.jsonl:1: field 'chosen'"),
        ([{"prompt": "a", "rejected": "y"}], "prefs.jsonl:1: field 'chosen'"),
    ],
)
def test_bad_rows_exit_2_with_one_line(rows, expected, tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["dpo", f"model={tiny_model}", f"data={data}", f"output_dir={out}"], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert expected in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("beta=0", "field 'beta' must be > 0"),
        ("lr=fast", "field 'lr' expects a number, got 'fast'"),
        ("learning_rate=1", "field 'learning_rate' unknown key"),
        ("model=/nonexistent/model", "/nonexistent/model: model directory not found"),
    ],
)
def test_bad_config_values_exit_2(
    override, expected, tiny_model, separable_prefs, tmp_path, capsys
):
    args = [
        "dpo",
        f"model={tiny_model}",
        f"data={separable_prefs}",
        f"output_dir={tmp_path / 'o'}",
        override,
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_existing_output_dir_is_never_overwritten(tiny_model, sft_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(
        ["sft", f"model={tiny_model}", f"data={sft_data}", f"output_dir={out}", "max_steps=1"],
        capsys,
    )
    assert code == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, _ = run_cli(
        [
            "sft",
            f"model={tiny_model}",
            f"data={sft_data}",
            f"output_dir={out}",
            "max_steps=1",
            "--overwrite",
        ],
        capsys,
    )
    assert code == 0
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_config_file_and_overrides(tiny_model, sft_data, tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {sft_data}\nmax_steps: 5\nbatch_size: 2\n")
    out = tmp_path / "run"
    code, _, _ = run_cli(
        ["sft", "--config", str(config), f"output_dir={out}", "max_steps=2"], capsys
    )
    assert code == 0
    saved = (out / "alignkit_config.yaml").read_text()
    assert "max_steps: 2" in saved and "batch_size: 2" in saved


def _train_args(tiny_model, data, out) -> list[str]:
    return [
        "dpo",
        f"model={tiny_model}",
        f"data={data}",
        f"output_dir={out}",
        "max_steps=8",
        "batch_size=2",
        "lr=1e-3",
        "save_steps=1",
        "bf16=false",
    ]


def test_resume_after_sigkill_matches_uninterrupted_run(
    tiny_model, separable_prefs, tmp_path, capsys
):
    full = tmp_path / "full"
    code, _, _ = run_cli(_train_args(tiny_model, separable_prefs, full), capsys)
    assert code == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit.cli", *_train_args(tiny_model, separable_prefs, killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and not (killed / "checkpoints" / "step-000003" / "meta.json").exists()
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"

    code, _, _ = run_cli([*_train_args(tiny_model, separable_prefs, killed), "--resume"], capsys)
    assert code == 0
    expected, resumed = (
        load_file(str(full / "model.safetensors")),
        load_file(str(killed / "model.safetensors")),
    )
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    checkpoints = sorted(
        p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")
    )
    assert len(checkpoints) <= 2  # keep_last=2


def test_nan_loss_stops_with_step_and_checkpoint(tiny_model, sft_data, tmp_path, capsys):
    out = tmp_path / "nan"
    code, _, err = run_cli(
        [
            "sft",
            f"model={tiny_model}",
            f"data={sft_data}",
            f"output_dir={out}",
            "max_steps=3",
            "lr=1e30",
            "max_grad_norm=0",
        ],
        capsys,
    )
    assert code == 3
    assert "at step" in err and "Last good checkpoint" in err
    assert not (out / "model.safetensors").exists()
