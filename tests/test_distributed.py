"""torchrun with 2 processes (DDP, gloo on CPU) follows the 1-process loss trajectory."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest

from alignkit.cli import main


def _losses(out) -> list[float]:
    with open(out / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_two_processes_match_one(command, tiny_model, separable_prefs, tmp_path, capsys):
    args = [
        command,
        f"model={tiny_model}",
        f"data={separable_prefs}",
        "max_steps=4",
        "batch_size=4",
        "lr=1e-3",
        "bf16=false",
        "eval_fraction=0",
    ]
    single = tmp_path / "single"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"output_dir={single}"])
    assert exit_info.value.code == 0

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "alignkit.cli",
            *args,
            f"output_dir={double}",
            "distributed=ddp",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = _losses(single), _losses(double)
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, abs=1e-5)
    assert not list(double.glob("metrics.csv.tmp"))


def test_launch_without_ddp_is_refused(tiny_model, separable_prefs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "dpo",
                f"model={tiny_model}",
                f"data={separable_prefs}",
                f"output_dir={tmp_path / 'o'}",
            ]
        )
    assert exit_info.value.code == 2
    assert "set distributed=ddp" in capsys.readouterr().err
