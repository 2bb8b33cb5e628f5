"""Online DPO: best-vs-worst pairs by hand, the toy reward rises, fixed/refresh reference,
CLI, same seed."""

from __future__ import annotations

import json

import torch

from alignkit.recipes.online_dpo import best_worst_pairs, pair_batches

from .online_helpers import TINY_ONLINE, metrics, run_cli, without_timing


def test_best_worst_pairs_by_hand_and_ties_dropped():
    rewards = torch.tensor([[0.1, 0.9, 0.4], [0.5, 0.5, 0.5], [2.0, -1.0, 2.0], [0.0, 0.0, 1.0]])
    prompts, chosen, rejected = best_worst_pairs(rewards)
    assert prompts.tolist() == [0, 2, 3]  # prompt 1: every sample ties
    assert chosen.tolist() == [1, 0, 2]  # ties for best: the first
    assert rejected.tolist() == [0, 1, 0]  # ties for worst: the first


def test_pair_batches_are_seeded_and_sized():
    batches = pair_batches(num_pairs=3, batch_size=2, steps=4, seed=1, round_number=1)
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    assert sorted(int(i) for i in torch.cat(batches[:1] + batches[1:2])[:3]) == [0, 1, 2]


def test_rounds_raise_the_toy_reward(tiny_model, tmp_path, capsys):
    out = tmp_path / "odpo"
    args = ["online-dpo", f"model={tiny_model}", f"output_dir={out}", *TINY_ONLINE]
    args += ["max_steps=6", "samples_per_prompt=4", "dpo_steps=4", "batch_size=4"]
    # fp32: 6 rounds at this rate are chaotic, and bf16 would make the outcome hang on
    # which kernels round where (the packed and plain forwards round differently)
    args += ["beta=0.1", "lr=3e-2", "bf16=false"]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    rows = metrics(out)
    for row in rows[1:]:
        assert row["pairs"] + row["ties_dropped"] == 4
        assert row["score_chosen"] > row["score_rejected"]
        assert 0 < row["loss"] < 1.0 and "rewards/accuracy" in row
    assert rows[-1]["rewards/accuracy"] >= 0.75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/reward"] > summary["reference_reward"] + 0.3, summary


def test_refresh_reference_same_seed_ties_and_bad_input(tiny_model, tmp_path, capsys):
    base = ["online-dpo", f"model={tiny_model}", *TINY_ONLINE, "max_steps=2", "eval_prompts=2"]
    base += ["samples_per_prompt=2", "dpo_steps=1", "lr=1e-2"]
    for name, update in (("a", "refresh"), ("b", "refresh"), ("fixed", "fixed")):
        code, err = run_cli(
            [*base, f"reference_update={update}", f"output_dir={tmp_path / name}"], capsys
        )
        assert code == 0, err
    refreshed = metrics(tmp_path / "a")
    assert without_timing(refreshed) == without_timing(metrics(tmp_path / "b"))
    # refresh: each round's single update starts with policy = reference, so h = 0 and the
    # DPO loss is log 2; with a fixed reference round 2 starts from the moved policy
    assert [round(row["loss"], 3) for row in refreshed[1:]] == [0.693, 0.693]
    fixed = metrics(tmp_path / "fixed")
    assert fixed[1]["loss"] == refreshed[1]["loss"]
    assert abs(fixed[2]["loss"] - 0.6931) > 1e-3
    # a reward on which every sample ties gives no pair and no update
    tie = [*base, "max_steps=1", "reward=tests.length_rewards:constant"]
    code, err = run_cli([*tie, f"output_dir={tmp_path / 'tie'}"], capsys)
    assert code == 0, err
    assert metrics(tmp_path / "tie")[1]["pairs"] == 0
    code, err = run_cli([*base, "samples_per_prompt=1", f"output_dir={tmp_path / 'c'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "samples_per_prompt" in err
