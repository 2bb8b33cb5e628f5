"""PPO on the tiny random model: it learns a toy reward, runs are reproducible and resumable,
the first minibatch is on-policy, the KL controller steers beta, and the CLI works."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.recipes import ppo

from .online_toy import mean, read_metrics, toy_overrides, write_prompts


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread: the tiny model's matmuls are too small to split, and on a
    shared machine two spinning threads per process made these runs ~6x slower."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set_threads() then leaves torch alone
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LEARN = {"max_steps": 8, "epochs": 2, "num_minibatches": 2}


def run_ppo(tiny_model, tmp_path, name: str, **extra):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / name
    config = load_config(ppo.Config, "ppo", None, toy_overrides(tiny_model, prompts, out, **extra))
    return ppo.run(config, overwrite=True), out


def test_ppo_learns_the_toy_reward_reproducibly_with_ratio_one_first(tiny_model, tmp_path):
    summary, out = run_ppo(tiny_model, tmp_path, "a", **LEARN)
    rows = read_metrics(out)
    assert len(rows) == LEARN["max_steps"] and summary["stopped"] == "max_steps"
    scores = [row["score"] for row in rows]
    assert mean(scores[-3:]) > mean(scores[:3]) + 0.1, scores
    # The first minibatch of every step is on-policy: pi / pi_old = 1 (fp32); later ones are not.
    assert max(row["first_ratio_dev"] for row in rows) < 1e-4
    assert max(row["approx_kl"] for row in rows) > 1e-4
    assert all(row["updates"] == LEARN["epochs"] * LEARN["num_minibatches"] for row in rows)
    for key in ("kl", "entropy", "clip_fraction", "value_loss", "explained_variance"):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1
    assert rows[-1]["kl"] > 0.0
    # Same seed -> the same metrics, byte for byte (a shorter rerun: the schedule is constant).
    _, again = run_ppo(tiny_model, tmp_path, "b", **{**LEARN, "max_steps": 3})
    lines = (out / "metrics.csv").read_text().splitlines()
    assert (again / "metrics.csv").read_text().splitlines() == lines[:4]
    assert (out / "value_head.safetensors").is_file() and (out / "config.json").is_file()


def test_adaptive_kl_controller_moves_beta_towards_the_target(tiny_model, tmp_path):
    common = {"max_steps": 3, "kl_coef": 0.1, "kl_horizon": 20, "prompts_per_step": 2}
    common.update({"samples_per_prompt": 2, "lora.r": 0, "lr": 1e-3})  # full weights
    _, low = run_ppo(tiny_model, tmp_path, "low", kl_target=1e-9, **common)
    _, high = run_ppo(tiny_model, tmp_path, "high", kl_target=1e6, **common)
    low_betas = [row["kl_coef"] for row in read_metrics(low)]
    high_betas = [row["kl_coef"] for row in read_metrics(high)]
    rows = 2 * 2  # prompts x samples: the controller's n_steps
    # KL far above target: beta grows by (1 + 0.2 n / horizon) once the KL is positive.
    assert low_betas[2] == pytest.approx(low_betas[1] * (1 + 0.2 * rows / 20))
    # KL far below target: beta shrinks by (1 - 0.2 n / horizon) every step.
    for step in range(1, len(high_betas)):
        assert high_betas[step] == pytest.approx(high_betas[step - 1] * (1 - 0.2 * rows / 20))
    assert high_betas[0] == pytest.approx(0.1)


def test_resume_after_a_kill_gives_identical_weights(tiny_model, tmp_path, monkeypatch):
    settings = {"max_steps": 4, "save_steps": 2, "epochs": 2, "num_minibatches": 2}
    _, straight = run_ppo(tiny_model, tmp_path, "straight", **settings)

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "killed"
    config = load_config(
        ppo.Config, "ppo", None, toy_overrides(tiny_model, prompts, out, **settings)
    )
    real_collect, calls = ppo.collect_experience, []

    def killed_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(ppo, "collect_experience", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(config, overwrite=True)
    monkeypatch.setattr(ppo, "collect_experience", real_collect)
    assert (out / "checkpoints" / "step-000002").is_dir()
    ppo.run(config, resume=True)

    for name in ("model.safetensors", "value_head.safetensors"):
        expected, resumed = load_file(straight / name), load_file(out / name)
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), (name, key)
    assert (out / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()


@pytest.fixture
def reward_model_dir(tiny_model, tmp_path):
    """A (random) reward model directory: the tiny model's backbone with a scalar head."""
    from alignkit.models import load_reward_backbone, load_tokenizer

    torch.manual_seed(1)
    path = tmp_path / "rm"
    load_reward_backbone(tiny_model).save_pretrained(path)
    load_tokenizer(tiny_model).save_pretrained(path)
    return path


def test_separate_critic_starts_from_the_reward_model(tiny_model, reward_model_dir):
    from alignkit.models import load_policy

    policy = load_policy(tiny_model)
    critic = ppo.build_critic("separate", policy, str(reward_model_dir), tiny_model)
    head = load_file(reward_model_dir / "model.safetensors")["score.weight"]
    assert torch.equal(critic.model.score.weight.detach(), head)
    fresh = ppo.build_critic("separate", policy, "task:sentiment", tiny_model)
    assert not torch.equal(fresh.model.score.weight.detach(), head)
    input_ids = torch.tensor([[1, 2, 3, 4]])
    values = critic(input_ids, torch.ones_like(input_ids))
    assert values.shape == (1, 4) and torch.isfinite(values).all()


def test_separate_critic_reward_norm_penalty_and_early_stop(tiny_model, tmp_path, reward_model_dir):
    summary, out = run_ppo(
        tiny_model,
        tmp_path,
        "separate",
        max_steps=2,
        reward=str(reward_model_dir),
        critic="separate",
        reward_norm="true",
        missing_eos="subtract",
        missing_eos_penalty=0.5,
        epochs=2,
        num_minibatches=2,
        target_approx_kl=1e-9,
    )
    rows = read_metrics(out)
    # No completion of 8 tokens reaches EOS: each score is reduced by 0.5 before normalising.
    assert all(row["eos_fraction"] == 0.0 for row in rows)
    assert rows[0]["reward"] == pytest.approx(0.0, abs=1e-5)  # normalised by its own stats
    # The first minibatch has approx KL 0; the second exceeds 1e-9 and stops the passes.
    assert [row["updates"] for row in rows] == [2.0, 2.0]
    assert (out / "critic" / "config.json").is_file()
    assert summary["steps"] == 2


@pytest.mark.parametrize(
    ("setting", "reason"), [("stop_reward=0.0", "stop_reward"), ("kl_budget=-1", "kl_budget")]
)
def test_stop_criteria_end_the_run(tiny_model, tmp_path, setting, reason):
    key, value = setting.split("=")
    summary, out = run_ppo(tiny_model, tmp_path, reason, max_steps=5, epochs=1, **{key: value})
    assert summary["stopped"] == reason and summary["steps"] == 1
    assert len(read_metrics(out)) == 1 and (out / "model.safetensors").is_file()


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_ppo_with_a_gold_task_and_a_bad_key(tiny_model, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        f"model={tiny_model}",
        "task=sentiment",
        "reward=task:sentiment",
        f"output_dir={out}",
        "max_steps=2",
        "prompts_per_step=2",
        "max_new_tokens=6",
        "eval_prompts=3",
        "epochs=1",
        "bf16=false",
    ]
    code, err = run_cli(["ppo", *args], capsys)
    assert code == 0, err
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1.0, 2.0]
    assert all(-1.0 <= row["gold"] <= 1.0 for row in rows)
    assert math.isfinite(rows[-1]["eval/gold"]) and math.isfinite(rows[-1]["eval/kl"])

    code, err = run_cli(["ppo", *args, "critic=twin"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "critic" in err and "Traceback" not in err
    code, err = run_cli(["ppo", *args, "--overwrite", "reward=no_such_module:score"], capsys)
    assert code == 2 and err.count("\n") == 1 and "reward" in err


def test_ppo_under_bf16_scores_every_pass_from_the_same_bf16_weights(tiny_model, tmp_path):
    """bf16 (OnlineRun.bf16_scope): rollout-time policy and value passes, the reference
    (held in bf16) and the updates compute from the same bf16 weights, so the first
    minibatch is on-policy to the bit; the saved policy and value head are the fp32
    masters."""
    settings = {**LEARN, "max_steps": 3, "bf16": "true", "lora.r": 0}
    _, out = run_ppo(tiny_model, tmp_path, "bf16", **settings)
    rows = read_metrics(out)
    # the policy pass reads the value head's hidden states through a hook in the plain
    # (rows, columns) layout and the reference runs packed, so the KL is 0 only to bf16
    # rounding here (rl's policy pass, packed too, gives exactly 0)
    assert abs(rows[0]["kl"]) < 5e-3 and rows[-1]["kl"] > 0.0
    assert [row["first_ratio_dev"] for row in rows] == [0.0] * 3
    for key in ("value_loss", "explained_variance", "clip_fraction"):
        assert all(math.isfinite(row[key]) for row in rows), key
    for name in ("model.safetensors", "value_head.safetensors"):
        tensors = load_file(out / name)
        assert {value.dtype for value in tensors.values()} == {torch.float32}, name
