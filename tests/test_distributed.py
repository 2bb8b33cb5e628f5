"""torchrun with 2 processes (gloo on CPU) follows the 1-process loss trajectory: DDP and
FSDP2 for the offline recipes; sharded rollouts with summed gradients (ddp) or a sharded
update and a plain rollout copy (fsdp) for the online ones."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main

from .conftest import REPO, torchrun_command
from .online_toy import toy_overrides, write_prompts


def _losses(out) -> list[float]:
    with open(out / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _rows(out) -> list[dict[str, float]]:
    with open(out / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def _torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``alignkit ARGS`` under torchrun on loopback, one thread per process."""
    argv, env = torchrun_command(args, processes)
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _one_then_two_processes(args: list[str], tmp_path, capsys) -> tuple[Path, Path]:
    """``alignkit ARGS`` in this process (one thread), then under torchrun with 2
    processes: the two run directories, both runs checked to have exited 0."""
    single, double = tmp_path / "single", tmp_path / "double"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, f"output_dir={single}"])
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    result = _torchrun([*args, f"output_dir={double}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return single, double


OFFLINE = [("dpo", "ddp"), ("reward", "ddp"), ("dpo", "fsdp"), ("reward", "fsdp"), ("sft", "fsdp")]


@pytest.mark.parametrize(("command", "mode"), OFFLINE)
def test_two_processes_match_one(
    command, mode, tiny_model, separable_prefs, sft_data, tmp_path, capsys
):
    """DDP replicates, FSDP2 shards (each decoder layer a group); both follow one process,
    and FSDP2 still writes a plain HF directory and full-tensor checkpoints from rank 0.
    SFT's loss is a token mean: each rank's share of the tokens weights its loss (with
    2 accumulated micro-batches, FSDP2's gradient sync is skipped on the first)."""
    data = sft_data if command == "sft" else separable_prefs
    args = [
        command,
        f"model={tiny_model}",
        f"data={data}",
        "max_steps=4",
        "batch_size=4",
        "lr=1e-3",
        "bf16=false",
        "eval_fraction=0.25",  # evaluation runs through the sharded module too
        "save_steps=2",
        *(["grad_accum=2"] if command == "sft" else []),
    ]
    single = tmp_path / "single"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"output_dir={single}"])
    assert exit_info.value.code == 0

    double = tmp_path / "double"
    result = _torchrun([*args, f"output_dir={double}", f"distributed={mode}"])
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = _losses(single), _losses(double)
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, abs=1e-5)
    want, have = _rows(single)[-1], _rows(double)[-1]
    assert have["eval/loss"] == pytest.approx(want["eval/loss"], abs=1e-5)
    assert "tokens" in want or command == "reward"
    # every logged key (the token count is the global batch's); the reward model's
    # rewards/std is the mean of the ranks' standard deviations, not the batch's. SFT
    # trains full weights at lr 1e-3, so after the first update its gradient norm drifts
    # with the weights' rounding (2.1e-5 relative at step 4, measured)
    per_rank = {"rewards/std"} if command == "reward" else set()
    rel = {"grad_norm": 1e-4} if command == "sft" else None
    assert _mismatches(_rows(single), _rows(double), per_rank, rel) == []
    assert not list(double.glob("metrics.csv.tmp"))
    for file in ("model.safetensors", "checkpoints/step-000002/model.safetensors"):
        want_w, have_w = load_file(single / file), load_file(double / file)
        assert want_w.keys() == have_w.keys(), file
        for key in want_w:
            assert torch.allclose(have_w[key], want_w[key], atol=1e-5), (file, key)
    if mode == "fsdp":
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(double).model_type == "llama"  # a plain HF dir
        # resume from the step-2 checkpoint (gathered optimizer state, sharded again):
        # the same final weights, bit for bit
        final = load_file(double / "model.safetensors")
        (double / "model.safetensors").unlink()
        result = _torchrun([*args, f"output_dir={double}", f"distributed={mode}", "--resume"])
        assert result.returncode == 0, result.stderr[-2000:]
        resumed = load_file(double / "model.safetensors")
        for key in final:
            assert torch.equal(resumed[key], final[key]), key
        assert _losses(double) == pytest.approx(expected, abs=1e-5)


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


def test_rows_sample_the_same_in_any_slice_of_the_batch(tiny_model, tokenizer):
    """With ``first_row`` every row draws from its own seed: two halves of a batch, sampled
    apart (other padding, other batch-mates), give the whole batch's tokens."""
    from alignkit.models import load_policy
    from alignkit.rollout import SamplingParams, generate

    policy = load_policy(tiny_model)
    prompts = [tokenizer(text)["input_ids"] for text in ("a b c d e", "x", "one two", "hi")]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=50, seed=11)
    whole = generate(policy, tokenizer, prompts, params, num_samples=2, bf16=False, first_row=0)
    first = generate(policy, tokenizer, prompts[:2], params, num_samples=2, bf16=False, first_row=0)
    second = generate(
        policy, tokenizer, prompts[2:], params, num_samples=2, bf16=False, first_row=4
    )
    assert first.completions + second.completions == whole.completions
    assert len(set(whole.completions)) > 4  # the rows' streams differ
    # without first_row one stream feeds the whole batch: a slice samples differently
    plain = generate(policy, tokenizer, prompts[2:], params, num_samples=2, bf16=False)
    assert plain.completions != second.completions


# FSDP2 trains full weights (LoRA is refused): a smaller learning rate than the LoRA runs,
# since Adam's update of a near-zero gradient turns its rounding into a weight change
# of up to ~lr x 1e-2 (full weights at lr=3e-3 differ by ~3e-5 under ddp too)
FSDP = {"distributed": "fsdp", "lora.r": 0, "lr": 3e-4}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ppo_two_processes_match_one(mode, tiny_model, tmp_path, capsys):
    """Each rank samples 2 of the 4 prompts of a step and takes half of every minibatch;
    scores, KL, losses and final weights follow the 1-process run of the same global batch.
    Under fsdp the update runs through the sharded policy and value head, the rollout and
    rank 0's evaluation on the plain copy, and a resume from the step-2 checkpoint ends
    bit for bit the same."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    settings = {
        "prompts_per_step": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 6,
        "max_steps": 3,
        "epochs": 2,
        "num_minibatches": 2,
        "kl_target": 0.01,
        "kl_horizon": 50,
        "save_steps": 2,
        "distributed": "ddp",
    }
    if mode == "fsdp":  # with evaluation on the held-out prompts of a task
        settings |= {**FSDP, "task": "sentiment", "eval_prompts": 2}
    args = ["ppo", *toy_overrides(tiny_model, prompts, tmp_path / "x", **settings)]
    args = [a for a in args if not a.startswith("output_dir=")]
    single, double = _one_then_two_processes(args, tmp_path, capsys)

    expected, got = _rows(single), _rows(double)
    steps = [1, 2, 3] if mode == "ddp" else [0, 1, 2, 3]  # step 0: the starting policy
    assert [r["step"] for r in got] == [r["step"] for r in expected] == steps
    logged = {key for row in expected if row["step"] for key in row}
    for key in ("score", "kl", "pg_loss", "value_loss", "clip_fraction", "value_clip_fraction"):
        assert key in logged, key
    assert _mismatches(expected, got) == []  # every logged key: scores, losses, fractions
    assert "eval/reward" in expected[-1] or mode == "ddp"
    assert len({r["score"] for r in expected if r["step"]}) > 1  # steps sampled differently
    files = ("model.safetensors", "value_head.safetensors")
    for file in (*files, "checkpoints/step-000002/model.safetensors"):
        want_w, have_w = load_file(single / file), load_file(double / file)
        assert want_w.keys() == have_w.keys(), file
        for key in want_w:
            assert torch.allclose(have_w[key], want_w[key], atol=1e-5), (file, key)
    assert not list(double.glob("*.tmp"))
    if mode == "ddp":
        return
    start = load_file(tiny_model + "/model.safetensors")
    moved = load_file(double / "model.safetensors")
    assert max(float((moved[k] - start[k]).abs().max()) for k in moved) > 1e-3  # it trained
    # resume from the step-2 checkpoint (full tensors, sharded again): the same final
    # weights bit for bit. Step 1's row is marked first: a run that started over would
    # rewrite it, a resumed one keeps the rows up to its checkpoint.
    final = {file: load_file(double / file) for file in files}
    (double / "model.safetensors").unlink()
    log = (double / "metrics.csv").read_text().splitlines()
    header = log[0].split(",")
    marked = log[2].split(",")  # step 1 (step 0 is the evaluation of the start)
    marked[header.index("score")] = "-7.0"
    lines = [*log[:2], ",".join(marked), *log[3:]]
    (double / "metrics.csv").write_text("\n".join(lines) + "\n")
    result = _torchrun([*args, f"output_dir={double}", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    for file in files:
        resumed = load_file(double / file)
        for key in final[file]:
            assert torch.equal(resumed[key], final[file][key]), (file, key)
    rows = _rows(double)
    assert rows[1]["score"] == -7.0  # resumed, not started over
    assert rows[2:] == got[2:]  # steps 2 and 3: the uninterrupted run's metrics


ONLINE = {
    # recipe arguments, the metrics that must match, and a per-update batch that splits
    "grpo": (["rl", "algo=grpo", "epochs=2", "num_minibatches=2"], ("loss", "approx_kl")),
    "rloo": (["rl", "algo=rloo"], ("loss", "advantage_std")),
    "reinforce_pp": (
        ["rl", "algo=reinforce_pp", "epochs=2", "num_minibatches=2"],
        ("loss", "approx_kl", "advantage_std"),
    ),
    "reinforce": (["rl", "algo=reinforce"], ("loss", "advantage_std")),  # moving baseline
    "rsft": (["rsft", "sft_steps=2", "batch_size=2"], ("sft_loss", "kept")),
    "online-dpo": (
        ["online-dpo", "dpo_steps=2", "batch_size=2", "task=sentiment", "eval_prompts=2"],
        ("loss", "pairs", "rewards/accuracy", "eval/reward"),
    ),
    "dm": (
        ["dm", "algo=brain", "proposal=adaptive", "proposal_update_every=1"],
        ("loss", "alpha_ess", "log_partition"),
    ),
    # DPG: ess_fraction over the whole batch, log Z(x) of every prompt; 2 updates per batch
    "dpg": (
        ["dm", "algo=dpg", "updates_per_batch=2"],
        ("loss", "ess_fraction", "log_partition", "importance_weight_mean"),
    ),
    # one step: GDC++'s loss is a difference of terms ~400 times larger, so once one
    # update has moved the weights by their rounding it differs by ~4e-5 (measured);
    # even its first loss matches only to the rounding of those terms (5.5e-5 seen)
    "gdcpp": (
        ["dm", "algo=gdcpp", "max_steps=1"],
        ("loss", "advantage_std", "log_partition", "baseline_mean"),
    ),
}


# every online recipe besides PPO also runs under fsdp (each case costs ~20 s)
ONLINE_FSDP = [name for name in ONLINE if name != "gdcpp"]  # gdcpp: ddp covers it
# not statistics of the batch: timings differ run to run
NOT_BATCH_STATISTICS = {"round_seconds"}


def _mismatches(
    expected: list[dict],
    got: list[dict],
    skip: set[str] = frozenset(),
    rel: dict[str, float] | None = None,
) -> list[tuple]:
    """(step, key, 1-process value, 2-process value) of every logged key that differs, or
    that one run logged and the other not: to 1e-5, and to 1e-5 relative above 1 (DPG's
    loss is ~60, where an fp32 rounding is 4e-6). The gradient norm needs the relative
    bound too: torch's fp32 norm over the 3M-element embedding carries ~5e-6 relative
    rounding (a float64 norm agrees to 1e-8 between the modes), and sharded it sums in
    another order."""
    out = []
    for want, have in zip(expected, got, strict=True):
        for key in sorted((set(want) | set(have)) - NOT_BATCH_STATISTICS - skip):
            if key not in want or key not in have:
                out.append((want["step"], key, want.get(key), have.get(key)))
            elif have[key] != pytest.approx(want[key], rel=(rel or {}).get(key, 1e-5), abs=1e-5):
                out.append((want["step"], key, want[key], have[key]))
    return out


@pytest.mark.parametrize(
    ("name", "mode"),
    [(name, "ddp") for name in ONLINE] + [(name, "fsdp") for name in ONLINE_FSDP],
)
def test_online_recipes_two_processes_match_one(name, mode, tiny_model, tmp_path, capsys):
    """Each rank samples half the prompts; the whole batch's scores, losses and weights
    are those of one process (rank 0 alone evaluates and writes). Under fsdp the update
    runs through the sharded policy, and the rollout and dm's adaptive proposal use the
    plain copy refreshed every step: every logged batch statistic then agrees."""
    recipe, keys = ONLINE[name]
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    settings = {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 6}
    settings |= {"max_steps": 2, "distributed": "ddp", **(FSDP if mode == "fsdp" else {})}
    overrides = toy_overrides(tiny_model, prompts, tmp_path / "x", **settings)
    extra = {a.split("=")[0] for a in recipe[1:]}
    args = [recipe[0], *recipe[1:]]
    args += [a for a in overrides if a.split("=")[0] not in extra | {"output_dir"}]
    single, double = _one_then_two_processes(args, tmp_path, capsys)

    expected, got = _rows(single), _rows(double)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    logged = {key for row in expected for key in row}
    assert set(keys) <= logged, set(keys) - logged  # the recipe's own statistics
    # GDC++'s loss (~0.17) is a difference of terms ~68, where one fp32 rounding is ~8e-6:
    # it can match only to ~20 roundings of those terms
    rel = {"loss": 1e-3, "loss_first": 1e-3} if name == "gdcpp" else None
    assert _mismatches(expected, got, rel=rel) == []  # every logged key, ddp and fsdp
    want_w, have_w = (
        load_file(single / "model.safetensors"),
        load_file(double / "model.safetensors"),
    )
    for key in want_w:
        assert torch.allclose(have_w[key], want_w[key], atol=1e-5), key


def test_optimizer_state_converts_between_numbered_and_named_forms(tiny_model):
    """A checkpoint from one process (parameters numbered) resumes under FSDP2 (parameters
    named) and back: the conversion keeps every moment and hyperparameter."""
    from alignkit.models import load_policy
    from alignkit.training.checkpoint import optimizer_state_by_index, optimizer_state_by_name
    from alignkit.training.optim import build_optimizer

    model = load_policy(tiny_model)
    optimizer, _ = build_optimizer(model, 1e-3, 0.1, 0, 10)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    numbered = optimizer.state_dict()
    named = optimizer_state_by_name(numbered, model, optimizer)
    assert "model.embed_tokens.weight" in named["state"]
    embed = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert torch.equal(
        named["state"]["model.embed_tokens.weight"]["exp_avg"], optimizer.state[embed]["exp_avg"]
    )
    assert named["param_groups"][0]["weight_decay"] == 0.1
    back = optimizer_state_by_index(named, model, optimizer)
    assert back["state"].keys() == numbered["state"].keys()
    for key, moments in numbered["state"].items():
        for name, value in moments.items():
            assert torch.equal(back["state"][key][name], value)
    assert [g["params"] for g in back["param_groups"]] == [
        g["params"] for g in numbered["param_groups"]
    ]
    optimizer.load_state_dict(back)  # loads as a plain state dict


def test_lora_refusal_is_one_rule_for_every_recipe():
    """``Distributed.refuse_lora`` (offline and online recipes call it): LoRA is refused
    only where the run is sharded."""
    from alignkit.errors import InputError
    from alignkit.training.distributed import Distributed

    sharded = Distributed(rank=1, world_size=2, mode="fsdp")
    with pytest.raises(InputError) as info:
        sharded.refuse_lora(True)
    assert str(info.value) == (
        "config: field 'distributed' LoRA is not supported with distributed=fsdp; "
        "use distributed=ddp"
    )
    sharded.refuse_lora(False)  # full weights
    Distributed(world_size=1, mode="fsdp").refuse_lora(True)  # one process: nothing sharded
    Distributed(rank=0, world_size=2, mode="ddp").refuse_lora(True)


@pytest.mark.parametrize("recipe", ["rl", "sft"])
def test_lora_under_fsdp_is_refused_before_any_file(recipe, tiny_model, sft_data, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    overrides = toy_overrides(tiny_model, prompts, out, prompts_per_step=4, distributed="fsdp")
    if recipe == "sft":  # offline: the adapter is checked on the loaded model
        keep = ("model=", "output_dir=", "lora.r=", "distributed=", "bf16=")
        overrides = [o for o in overrides if o.startswith(keep)]
        overrides += [f"data={sft_data}", "batch_size=4"]
    result = _torchrun([recipe, *overrides, "max_steps=1"])  # the toy runs train LoRA
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("alignkit:")]
    assert lines and "field 'distributed'" in lines[0], result.stderr[-2000:]
    assert "LoRA is not supported with distributed=fsdp" in lines[0]
    assert len(lines) in (1, 2) and len(set(lines)) == 1, lines
    assert "/alignkit/" not in result.stderr
    assert not out.exists()


def test_online_batch_that_does_not_split_is_refused_before_any_file(tiny_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    overrides = toy_overrides(tiny_model, prompts, out, prompts_per_step=4, distributed="ddp")
    # 4 prompts x 1 sample in 4 minibatches: 1 row each, which 2 ranks cannot share
    args = ["ppo", *overrides, "samples_per_prompt=1", "num_minibatches=4", "max_steps=1"]
    result = _torchrun(args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("alignkit:")]
    assert lines and "field 'num_minibatches'" in lines[0], result.stderr[-2000:]
    assert "do not split evenly over 2 processes" in lines[0]
    # each rank refuses with the same line, unless the launcher stops one rank when the
    # other exits first (a race): one or two lines, never different ones
    assert len(lines) in (1, 2) and len(set(lines)) == 1, lines
    assert "/alignkit/" not in result.stderr  # no traceback from alignkit's code
    assert not out.exists()


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        (["lora.r=4", "distributed=fsdp", "batch_size=4"], "distributed", "LoRA is not supported"),
        (["distributed=ddp", "batch_size=3"], "batch_size", "does not split evenly over 2"),
    ],
    ids=["lora-fsdp", "batch-split"],
)
def test_dpo_distributed_refusal_comes_before_the_reference_pass(
    settings, field, message, tiny_model, separable_prefs, tmp_path
):
    """The refusal comes before any forward pass: the reference log-probs are neither
    computed nor cached (the cache root is this test's), and no run directory exists."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    (cache / "marker").write_text("untouched")
    args = ["dpo", f"model={tiny_model}", f"data={separable_prefs}", f"output_dir={out}"]
    args += [*settings, "max_steps=1", "bf16=false"]
    argv, env = torchrun_command(args)
    result = subprocess.run(
        argv,
        env={**env, "ALIGNKIT_CACHE": str(cache)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("alignkit:")]
    assert lines and message in lines[0], result.stderr
    assert f"field '{field}'" in lines[0]
    assert len(lines) in (1, 2) and len(set(lines)) == 1, lines  # one line per rank
    assert "/alignkit/" not in result.stderr  # no traceback from alignkit's code
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # the failed rank's status, as torchrun reports it
    assert sorted(p.name for p in cache.rglob("*")) == ["marker"]  # no reference_logps entry
    assert not out.exists()
