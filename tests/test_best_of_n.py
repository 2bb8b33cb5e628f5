"""Best-of-n: the argmax is kept, the KL bound by hand, BoN beats a single sample, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.cli import main
from alignkit.models import load_policy, load_tokenizer
from alignkit.recipes.best_of_n import best_of_n, kl_upper_bound, select_best
from alignkit.rollout import SamplingParams

from .length_rewards import long_text

PROMPTS = ["The film opens with", "I watched this movie and", "The actors were", "Overall it"]


def test_kl_upper_bound_by_hand():
    assert kl_upper_bound(1) == 0.0
    assert kl_upper_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.193147
    assert kl_upper_bound(4) == pytest.approx(0.636294, abs=1e-6)  # 1.386294 - 0.75
    assert kl_upper_bound(8) == pytest.approx(1.204442, abs=1e-6)  # 2.079442 - 0.875
    with pytest.raises(ValueError):
        kl_upper_bound(0)


def test_select_best_takes_the_argmax_and_the_first_of_ties():
    rewards = torch.tensor([[0.1, 0.7, 0.3], [2.0, 2.0, -1.0], [-3.0, -2.0, -2.5]])
    index, best = select_best(rewards)
    assert index.tolist() == [1, 0, 1]
    assert best.tolist() == pytest.approx([0.7, 2.0, -2.0])


@pytest.fixture(scope="module")
def policy(tiny_model):
    return load_policy(tiny_model), load_tokenizer(tiny_model)


def _run(policy, seed: int, prompts: list[str] = PROMPTS, n: int = 6):
    model, tokenizer = policy
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed)
    return best_of_n(model, tokenizer, prompts, long_text, n, params, prompts_per_batch=3)


def test_best_of_n_keeps_the_argmax_and_beats_a_single_sample(policy):
    result = _run(policy, seed=0)
    assert result.rewards.shape == (4, 6) and len(result.samples) == 4
    for i, row in enumerate(result.samples):
        rescored = torch.tensor(long_text([PROMPTS[i]] * 6, row))
        torch.testing.assert_close(
            result.rewards[i], rescored
        )  # each sample scored with its prompt
        assert result.completions[i] == row[int(rescored.argmax())]
        assert result.best_rewards[i] == rescored.max()
    best_mean, single_mean = result.best_rewards.mean(), result.rewards.mean()
    assert best_mean >= single_mean
    assert best_mean - single_mean > 0.05  # random tokens differ in length: n = 6 helps


def test_same_seed_same_result_and_another_seed_differs(policy):
    first, again, other = (_run(policy, seed, PROMPTS[:2], n=3) for seed in (0, 0, 1))
    assert first.samples == again.samples
    torch.testing.assert_close(first.rewards, again.rewards)
    assert first.samples != other.samples


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_writes_chosen_completions_summary_and_bound(tiny_model, tmp_path, capsys):
    out = tmp_path / "bon"
    args = [
        "bon",
        f"model={tiny_model}",
        "task=sentiment",
        "reward=tests.length_rewards:long_text",
        "n=4",
        "max_prompts=5",
        "prompts_per_batch=2",
        "max_new_tokens=6",
        f"output_dir={out}",
    ]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    assert "upper bound" in err and "2401.01879" in err
    rows = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert row["index"] == max(range(4), key=lambda j: (row["rewards"][j], -j))
        assert row["reward"] == max(row["rewards"])
        assert row["reward"] == pytest.approx(len(row["completion"]) / 40.0)
        assert -1.0 <= row["gold"] <= 1.0  # the sentiment task's VADER judge
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl_upper_bound"] == pytest.approx(math.log(4) - 0.75)
    assert summary["reward/best_of_n"] == pytest.approx(sum(r["reward"] for r in rows) / 5)
    assert summary["reward/best_of_n"] >= summary["reward/single_sample"]
    assert {"gold/best_of_n", "gold/single_sample", "kl_note"} <= set(summary)
    # a second run refuses the existing directory
    code, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err


def test_cli_bad_input_is_one_line_exit_2(tiny_model, tmp_path, capsys):
    code, err = run_cli(["bon", f"model={tiny_model}", "n=0", f"output_dir={tmp_path}/x"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "'n'" in err and "must be >= 1" in err
    assert not (tmp_path / "x").exists()
