"""Rejection-sampling fine-tuning: selection by hand, the toy reward rises, CLI, same seed."""

from __future__ import annotations

import json
import math

import torch

from alignkit.recipes.rejection_sampling import round_threshold, select_samples, sft_batches

from .online_helpers import TINY_ONLINE, metrics, run_cli, without_timing


def test_select_top_k_per_prompt_and_threshold_by_hand():
    rewards = torch.tensor([[0.2, 0.9, 0.5, 0.9], [-1.0, -2.0, -0.5, -3.0]])
    top1 = select_samples(rewards, "top", keep_top=1)
    assert top1.tolist() == [[False, True, False, False], [False, False, True, False]]
    top2 = select_samples(rewards, "top", keep_top=2)  # the tie at 0.9 keeps both
    assert top2.tolist() == [[False, True, False, True], [True, False, True, False]]
    over = select_samples(rewards, "threshold", threshold=0.5)
    assert over.tolist() == [[False, True, True, True], [False, False, False, False]]
    assert [round_threshold(0.5, 0.25, r) for r in (1, 2, 3)] == [0.5, 0.75, 1.0]


def test_sft_batches_cover_the_kept_rows_and_are_seeded():
    batches = sft_batches(num_rows=5, batch_size=4, steps=3, seed=0, round_number=2)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(set(int(i) for b in batches[:2] for i in b)) == [0, 1, 2, 3, 4]
    again = sft_batches(5, 4, 3, 0, 2)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_rounds_raise_the_toy_reward(tiny_model, tmp_path, capsys):
    out = tmp_path / "rsft"
    args = ["rsft", f"model={tiny_model}", f"output_dir={out}", *TINY_ONLINE]
    args += ["max_steps=3", "samples_per_prompt=4", "sft_steps=8", "batch_size=4", "lr=1e-2"]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the starting policy's eval
    for row in rows[1:]:
        assert row["kept"] == 4  # top-1 of each of 4 prompts
        assert row["score_kept"] >= row["score"]
        assert math.isfinite(row["sft_loss"]) and "gold" in row
    # SFT on the selected samples concentrates the policy on long tokens: held-out reward up
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/reward"] > summary["reference_reward"] + 0.3, summary
    assert rows[-1]["sft_loss"] < rows[1]["sft_loss"] - 1.0


def test_same_seed_same_run_threshold_selection_and_bad_input(tiny_model, tmp_path, capsys):
    base = ["rsft", f"model={tiny_model}", *TINY_ONLINE, "max_steps=1", "samples_per_prompt=3"]
    base += ["selection=threshold", "threshold=0.5", "sft_steps=2", "eval_prompts=2"]
    for name in ("a", "b"):
        code, err = run_cli([*base, f"output_dir={tmp_path / name}"], capsys)
        assert code == 0, err
    assert without_timing(metrics(tmp_path / "a")) == without_timing(metrics(tmp_path / "b"))
    assert metrics(tmp_path / "a")[-1]["threshold"] == 0.5
    code, err = run_cli([*base, "keep_top=4", f"output_dir={tmp_path / 'c'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "keep_top" in err
    assert not (tmp_path / "c").exists()
