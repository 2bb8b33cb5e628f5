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
import torch

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


def test_demo_resume_keeps_finished_stages_and_refuses_other_settings(tiny_model, tmp_path):
    """A killed demo continues: finished stages are kept, the missing one runs, settings must match."""
    from alignkit.cli import run

    out = tmp_path / "demo"
    settings = [
        f"model={tiny_model}", f"output_dir={out}", "methods=dpo,best_of_n",
        "feedback_prompts=8", "k=2", "max_new_tokens=6", "reward_steps=2", "dpo_steps=2",
        "bon_n=2", "eval_prompts=4", "threads=1",
    ]  # fmt: skip
    assert run(["demo", "--quick", *settings]) == 0
    timings = json.loads((out / "timings.json").read_text())
    reward_weights = out / "reward_model" / "model.safetensors"
    reward_mtime = reward_weights.stat().st_mtime_ns
    dpo_weights = out / "dpo" / "model.safetensors"
    # "kill" the run after the reward model: best-of-n never wrote its summary
    (out / "best_of_n" / "summary.json").unlink()
    (out / "report.html").unlink()

    assert run(["demo", "--quick", "--resume", *settings]) == 0
    resumed = json.loads((out / "timings.json").read_text())
    for stage in ("sample", "feedback", "reward_model", "dpo"):
        assert resumed[stage] == timings[stage], stage  # not run again
    assert reward_weights.stat().st_mtime_ns == reward_mtime
    assert dpo_weights.is_file()
    assert (out / "best_of_n" / "summary.json").is_file()  # the missing stage ran
    assert (out / "report.html").is_file()
    results = json.loads((out / "results.json").read_text())
    assert {p["name"] for p in results["policies"]} == {"dpo", "best_of_n"}

    from alignkit.errors import InputError

    with pytest.raises(InputError, match="other settings"):
        run(["demo", "--quick", "--resume", *settings, "dpo_steps=3"])
    with pytest.raises(InputError, match="--resume"):
        run(["demo", "--quick", *settings])  # an existing run is never replaced silently
    assert reward_weights.stat().st_mtime_ns == reward_mtime


def test_dpo_trains_on_a_seeded_sample_of_as_many_pairs_as_it_visits(tmp_path):
    from alignkit.demo import DemoSettings, _dpo_pairs

    (tmp_path / "data").mkdir()
    # sampled text can hold U+2028, which json.dumps leaves raw and splitlines() splits on
    lines = [
        json.dumps({"prompt": f"p{i}", "chosen": "a\u2028", "rejected": "b"}, ensure_ascii=False)
        + "\n"
        for i in range(50)
    ]
    (tmp_path / "data" / "pairs.jsonl").write_text("".join(lines))
    subset = _dpo_pairs(DemoSettings(dpo_steps=3, seed=1), tmp_path).read_text()
    kept = [line + "\n" for line in subset.split("\n")[:-1]]
    assert len(kept) == 24 and set(kept) <= set(lines)  # 3 steps x 8 pairs, all from the pairs
    assert [lines.index(row) for row in kept] == sorted(lines.index(row) for row in kept)
    assert _dpo_pairs(DemoSettings(dpo_steps=3, seed=1), tmp_path).read_text() == subset
    assert _dpo_pairs(DemoSettings(dpo_steps=3, seed=2), tmp_path).read_text() != subset
    everything = _dpo_pairs(DemoSettings(dpo_steps=20), tmp_path).read_text()
    assert everything == "".join(lines)  # fewer pairs than 20 x 8: all of them


def test_parallel_methods_train_the_same_models_as_one_after_another(tiny_model, tmp_path):
    """``jobs=2`` trains (and samples) two methods at a time, each in a process of its
    own with one thread: models and evaluation are those of a one-thread run in order,
    bit for bit; a method that fails in its process is recorded, the others finish."""
    from safetensors.torch import load_file

    from alignkit.cli import run

    common = [
        f"model={tiny_model}", "feedback_prompts=8", "k=2", "max_new_tokens=6",
        "reward_steps=2", "dpo_steps=2", "bon_n=2", "eval_prompts=4", "policy_steps=1",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(["demo", "--quick", *common, f"output_dir={one}", "methods=dpo,best_of_n",
                "threads=1"]) == 0  # fmt: skip
    # kl_coef <= 0 is refused by rloo's recipe alone (dpo and best-of-n do not read it)
    assert run(["demo", "--quick", *common, f"output_dir={two}", "kl_coef=-1",
                "methods=dpo,rloo,best_of_n", "threads=2", "jobs=2"]) == 1  # fmt: skip

    want, have = (
        load_file(one / "dpo" / "model.safetensors"),
        load_file(two / "dpo" / "model.safetensors"),
    )
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert (one / "best_of_n" / "best_of_n.jsonl").read_text() == (
        two / "best_of_n" / "best_of_n.jsonl"
    ).read_text()
    results = json.loads((two / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["dpo", "best_of_n"]  # method order
    # dpo was sampled and scored in its own process: the same evaluation as in order
    alone = json.loads((one / "results.json").read_text())["policies"][0]
    assert results["policies"][0]["samples"] == alone["samples"]
    assert results["policies"][0]["gold_win_rate"] == alone["gold_win_rate"]
    assert set(results["not_run"]) == {"rloo"} and "kl_coef" in results["not_run"]["rloo"]
    assert "kl_coef" in (two / "rloo" / "error.txt").read_text()
    assert results["demo"]["jobs"] == 2
    timings = json.loads((two / "timings.json").read_text())
    for method in ("dpo", "best_of_n"):
        assert timings[method]["within"] == "methods"
        assert (two / "logs" / f"{method}.log").stat().st_size > 0
    # the block counts once in the total (taken before the report), and its CPU seconds
    # are its processes'
    outside = [v["wall_seconds"] for k, v in timings.items() if "within" not in v and k != "report"]
    assert results["demo"]["wall_seconds"] == pytest.approx(sum(outside), abs=0.2)
    inside = sum(timings[m]["cpu_seconds"] for m in ("dpo", "best_of_n"))
    assert timings["methods"]["cpu_seconds"] >= inside
