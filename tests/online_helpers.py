"""Running an online recipe on the tiny model in tests: the CLI, and its metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from alignkit.cli import main

# Settings every online-recipe test shares: tiny prompts batches, short completions,
# the length toy reward, the sentiment task's prompts (its gold judge is logged too).
TINY_ONLINE = [
    "task=sentiment",
    "reward=tests.length_rewards:long_text",
    "prompts_per_step=4",
    "max_new_tokens=6",
    "eval_prompts=4",
    "lr_schedule=constant",
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``alignkit ARGS``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def metrics(output_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as numbers (empty cells dropped)."""
    with open(output_dir / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]
