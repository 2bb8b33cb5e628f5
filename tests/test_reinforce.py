"""RLOO, GRPO / Dr.GRPO, REINFORCE++ and REINFORCE on the tiny random model: each learns a
toy reward, the first minibatch is on-policy, runs are reproducible and resumable, and
``alignkit rl`` works from the command line."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.recipes import online_run, policy_gradient, reinforce

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


def run_rl(tiny_model, tmp_path, name: str, **extra):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / name
    overrides = toy_overrides(tiny_model, prompts, out, **extra)
    config = load_config(reinforce.Config, "rl", None, overrides)
    return reinforce.run(config, overwrite=True), out


@pytest.mark.parametrize(
    "settings",
    [
        {"algo": "rloo"},
        {"algo": "grpo", "epochs": 2, "num_minibatches": 2},
        {"algo": "reinforce_pp", "epochs": 2},
        {"algo": "reinforce"},
    ],
    ids=lambda s: s["algo"],
)
def test_each_algorithm_learns_the_toy_reward(tiny_model, tmp_path, settings):
    _, out = run_rl(tiny_model, tmp_path, settings["algo"], max_steps=8, **settings)
    rows = read_metrics(out)
    scores = [row["score"] for row in rows]
    assert mean(scores[-3:]) > mean(scores[:3]) + 0.1, scores
    assert max(row["first_ratio_dev"] for row in rows) < 1e-4
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] > 0.0
    for key in ("entropy", "loss", "grad_norm", "approx_kl", "response_length"):
        assert all(math.isfinite(row[key]) for row in rows), key
    if settings.get("epochs", 1) > 1:
        assert max(row["approx_kl"] for row in rows) > 1e-4  # later minibatches are off-policy
        assert "clip_fraction" in rows[0]


def test_same_seed_same_metrics_and_dr_grpo_settings(tiny_model, tmp_path):
    dr_grpo = {"algo": "grpo", "scale_by_std": "false", "aggregation": "constant", "max_steps": 3}
    _, first = run_rl(tiny_model, tmp_path, "first", **dr_grpo)
    _, second = run_rl(tiny_model, tmp_path, "second", **dr_grpo)
    assert (first / "metrics.csv").read_text() == (second / "metrics.csv").read_text()
    rows = read_metrics(first)
    # Dr.GRPO advantages are s - mean(s): their spread is that of the scores, not 1.
    assert all(row["advantage_std"] < 0.5 for row in rows)
    _, other_seed = run_rl(tiny_model, tmp_path, "third", seed=1, **dr_grpo)
    assert (first / "metrics.csv").read_text() != (other_seed / "metrics.csv").read_text()


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_one_update_per_rollout_reuses_its_forward_for_the_rollout_log_probs(
    tiny_model, tmp_path, monkeypatch, algo
):
    """One epoch, one minibatch: the update's forward gives the old log-probs, and the run
    is the one that takes them from a pass of its own before the update."""
    settings = {"algo": algo, "max_steps": 3, "kl_coef": 0.5, "seed": 3}
    if algo == "rloo":
        settings["kl_in"] = "loss"  # in the reward, the KL is needed before the update
    passes = []
    original = reinforce.forward_pass

    def counted(*args, **kwargs):
        passes.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(reinforce, "forward_pass", counted)
    monkeypatch.setattr(policy_gradient, "forward_pass", counted)
    _, reused = run_rl(tiny_model, tmp_path, "reused", **settings)
    assert passes == [True] * 3  # the update's forward only, one a step
    passes.clear()
    monkeypatch.setattr(reinforce, "reuses_update_logps", lambda config, distributed: False)
    _, separate = run_rl(tiny_model, tmp_path, "separate", **settings)
    assert passes == [False, True] * 3  # a no-grad pass, then the update's
    reused_rows, separate_rows = read_metrics(reused), read_metrics(separate)
    assert reused_rows[-1]["kl"] > 1e-3  # the policy moved: a KL that could differ
    for a, b in zip(reused_rows, separate_rows, strict=True):
        for key in ("score", "kl", "entropy", "loss", "grad_norm", "approx_kl", "reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["first_ratio_dev"] == 0.0
    reused_weights = load_file(reused / "model.safetensors")
    separate_weights = load_file(separate / "model.safetensors")
    for name, value in reused_weights.items():
        assert torch.allclose(value, separate_weights[name], atol=1e-6), name


@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
def test_under_bf16_every_pass_of_a_step_computes_from_the_same_bf16_weights(
    tiny_model, tmp_path, monkeypatch, lora_r
):
    """bf16: the step's sampling with the rollout-time and reference passes, then the
    update's forward and backward, each run inside bf16_scope, and a separate reference
    holds bf16 weights. So before the first update the policy is its reference to the
    bit (KL exactly 0), and the first minibatch is on-policy to the bit; under autocast
    with a bf16 reference neither would be."""
    scopes = []
    original = online_run.bf16_compute

    def counted(model, enabled=None):
        scopes.append(enabled)
        return original(model, enabled=enabled)

    monkeypatch.setattr(online_run, "bf16_compute", counted)
    settings = {"algo": "grpo", "kl_coef": 0.5, "epochs": 2, "max_steps": 2, "lr": 3e-2}
    _, out = run_rl(tiny_model, tmp_path, "bf16", bf16="true", **{"lora.r": lora_r}, **settings)
    assert scopes == [True, True, True] * 2  # a step: rollout, then an update per epoch
    rows = read_metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 1e-4
    assert [row["first_ratio_dev"] for row in rows] == [0.0, 0.0]


def test_rollout_log_probs_get_a_pass_of_their_own_where_the_update_cannot_give_them():
    def config(**extra):
        return load_config(reinforce.Config, "rl", None, [f"{k}={v}" for k, v in extra.items()])

    assert reinforce.reuses_update_logps(config(algo="grpo"), distributed=False)
    assert not reinforce.reuses_update_logps(config(algo="grpo"), distributed=True)
    assert not reinforce.reuses_update_logps(config(algo="grpo", epochs=2), distributed=False)
    two = config(algo="grpo", num_minibatches=2, prompts_per_step=2)
    assert not reinforce.reuses_update_logps(two, distributed=False)
    # KL in the reward: the advantages need the rollout's log-probs before the update
    assert not reinforce.reuses_update_logps(config(algo="rloo"), distributed=False)
    assert reinforce.reuses_update_logps(config(algo="rloo", kl_coef=0), distributed=False)
    assert not reinforce.reuses_update_logps(config(algo="reinforce_pp"), distributed=False)


def test_kl_in_loss_or_reward(tiny_model, tmp_path):
    _, in_reward = run_rl(tiny_model, tmp_path, "r", algo="rloo", max_steps=2, kl_coef=1.0)
    _, in_loss = run_rl(
        tiny_model, tmp_path, "l", algo="rloo", max_steps=2, kl_coef=1.0, kl_in="loss"
    )
    reward_rows, loss_rows = read_metrics(in_reward), read_metrics(in_loss)
    # In the reward: R = s - beta * KL; in the loss the reward is the bare score.
    for row in reward_rows:
        assert row["reward"] == pytest.approx(row["score"] - row["kl"], abs=1e-5)
    for row in loss_rows:
        assert row["reward"] == pytest.approx(row["score"], abs=1e-6)


def test_resume_restores_weights_and_baseline(tiny_model, tmp_path, monkeypatch):
    settings = {"algo": "reinforce", "max_steps": 4, "save_steps": 2}
    _, straight = run_rl(tiny_model, tmp_path, "straight", **settings)

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "killed"
    overrides = toy_overrides(tiny_model, prompts, out, **settings)
    config = load_config(reinforce.Config, "rl", None, overrides)
    real_collect, calls = reinforce.collect_experience, []

    def killed_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(reinforce, "collect_experience", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        reinforce.run(config, overwrite=True)
    monkeypatch.setattr(reinforce, "collect_experience", real_collect)
    reinforce.run(config, resume=True)

    expected, resumed = (
        load_file(straight / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert (out / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_rl_runs_and_rejects_a_single_sample_rloo(tiny_model, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "cli"
    args = toy_overrides(tiny_model, prompts, out, algo="grpo", max_steps=2, prompts_per_step=2)
    code, err = run_cli(["rl", *args], capsys)
    assert code == 0, err
    assert [row["step"] for row in read_metrics(out)] == [1.0, 2.0]
    assert (out / "model.safetensors").is_file() and (out / "summary.json").is_file()

    code, err = run_cli(["rl", *args, "--overwrite", "algo=rloo", "samples_per_prompt=1"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "samples_per_prompt" in err and "Traceback" not in err
    code, err = run_cli(["rl", *args], capsys)  # the run directory exists: no --overwrite
    assert code == 2 and "output_dir" in err
