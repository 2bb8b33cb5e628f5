"""``alignkit demo --quick`` on the real embedded model, end to end (the CI run of the demo).

It takes about 5 minutes on 2 idle cores (longer on a busy machine): SFT is off, a
simulated panel ranks samples through the store, a reward model is trained, every
available recipe runs a few steps, and each is evaluated against the starting policy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_quick_demo_end_to_end(tmp_path):
    output_dir = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "demo", "--quick", f"output_dir={output_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (output_dir / "report.html").is_file()
    for plot in ("win_rates.png", "frontier.png", "training.png", "length_vs_reward.png"):
        assert (output_dir / plot).stat().st_size > 5_000, plot
    assert (output_dir / "agreement.png").is_file()

    results = json.loads((output_dir / "results.json").read_text())
    methods = [p["name"] for p in results["policies"]]
    assert methods, "no method finished"
    assert {"dpo", "best_of_n"} <= set(methods)  # recipes of the committed code base
    for policy in results["policies"]:
        win = policy["gold_win_rate"]
        assert math.isfinite(win["win_rate"]) and 0.0 <= win["win_rate"] <= 1.0, policy["name"]
        assert 0.0 <= win["low"] <= win["win_rate"] <= win["high"] <= 1.0
        assert win["n"] == results["num_prompts"]
        assert policy["train_seconds"] > 0
    # every method is either in the table or listed with the reason it is not
    expected = set(results["demo"]["settings"]["methods"].split(","))
    assert expected == set(methods) | set(results["not_run"])
    # the reward model learned the panel's preferences beyond chance on held-out pairs
    assert results["demo"]["reward_model"]["eval/rewards/accuracy"] > 0.5
    # the panel's bad annotators were found: the adversarial one is excluded
    feedback = json.loads((output_dir / "feedback.json").read_text())
    kinds = feedback["annotator_kinds"]
    assert any(kinds[name] == "adversarial" for name in feedback["excluded"])
    assert all(kinds[name] != "careful" for name in feedback["excluded"])
    # the table printed at the end names every finished method
    for name in methods:
        assert name in completed.stdout
