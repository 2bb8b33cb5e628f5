"""Crash safety of every training recipe: SIGKILL at a random step, ``--resume``, and the
final weights (and the metrics log) equal those of an uninterrupted run, bit for bit.

Each case runs the recipe three times on the tiny model in fp32 with one thread: once
straight through (in this process), once in a child process that is SIGKILLed right
after a randomly chosen checkpoint appears (plus a random delay of up to 0.15 s, so the
kill may land mid-step or while the next checkpoint is being written; at most half the
time between the last two checkpoints, so a fast run cannot finish first), and once more with
``--resume`` in this process. The chosen step and delay are in every failure message; set
``CRASH_SEED`` to replay one. (best-of-n trains nothing and refuses ``--resume``.)
PPO and DPO are also killed as 2-process ``distributed=fsdp`` jobs under torchrun
(torchrun and both ranks at once) and resumed under torchrun.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main

from .conftest import REPO, torchrun_command, write_jsonl
from .online_toy import toy_overrides, write_prompts

MAX_STEPS = 7
KEEP_LAST = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _offline(command: str, data: str, *extra: str) -> list[str]:
    return [command, f"data={data}", "batch_size=2", "lr=1e-3", "eval_fraction=0", *extra]


def _online(command: str, prompts: Path, **extra: object) -> list[str]:
    settings = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4, **extra}
    overrides = toy_overrides("MODEL", prompts, Path("OUT"), **settings)
    return [command] + [o for o in overrides if not o.startswith(("model=", "output_dir="))]


def _unpaired(path: Path) -> Path:
    rows = [
        {"prompt": f"Do you like {topic}?", "completion": f"{word} {topic}", "label": good}
        for topic in ("cats", "rain", "tea", "maps")
        for word, good in (("yes", True), ("no", False))
    ]
    return write_jsonl(path, rows)


def _cases(sft_data: Path, prefs: Path, prompts: Path) -> dict[str, list[str]]:
    """Recipe arguments, each set so that resuming has state beyond the weights to restore."""
    unpaired = _unpaired(prompts.with_name("unpaired.jsonl"))
    return {
        "sft": _offline("sft", str(sft_data)),
        "reward": _offline("reward", str(prefs), "center_coef=0.01"),
        "kto": _offline("dpo", str(unpaired), "loss=kto"),
        # PPO: value head, adaptive KL controller, running reward moments, minibatches
        "ppo": _online(
            "ppo",
            prompts,
            epochs=2,
            num_minibatches=2,
            kl_coef=0.05,
            kl_target=0.01,
            kl_horizon=50,
            reward_norm="true",
        ),
        "rloo": _online("rl", prompts, algo="rloo"),
        "grpo": _online("rl", prompts, algo="grpo", epochs=2, num_minibatches=2),
        "reinforce": _online("rl", prompts, algo="reinforce"),  # moving baseline
        "rsft": _online("rsft", prompts, sft_steps=2, batch_size=2),
        "online-dpo": _online("online-dpo", prompts, dpo_steps=2, batch_size=2),
        # adaptive proposal: its weights, the KL schedule and the per-prompt Z(x) estimates
        "dm": _online("dm", prompts, algo="gdcpp", proposal="adaptive", proposal_update_every=2),
    }


CASE_NAMES = [
    "sft",
    "reward",
    "kto",
    "ppo",
    "rloo",
    "grpo",
    "reinforce",
    "rsft",
    "online-dpo",
    "dm",
]


def _run_here(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 0, err[-2000:]


def _metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as handle:
        return [
            {k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(handle)
        ]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))


def _wait_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, delay: float) -> bool:
    """Wait for checkpoints ``step - 1`` and ``step``, then ``delay`` s, at most half the time
    between them (on a fast machine the tiny runs' last steps and final save took less
    than 0.15 s: the kill came after the end). False if the run ended before ``step``."""
    times = []
    for number in (step - 1, step):
        marker = out / "checkpoints" / f"step-{number:06d}" / "meta.json"
        # no wall-clock limit: on a loaded machine the child may take minutes to get there;
        # it either writes the checkpoint or ends by itself, and both are seen here
        while not (seen := marker.exists()) and proc.poll() is None:
            time.sleep(0.001)
        times.append(time.monotonic())
    time.sleep(min(delay, (times[1] - times[0]) / 2))
    return seen


def _kill_after_checkpoint(args: list[str], out: Path, step: int, delay: float) -> None:
    """Start ``alignkit ARGS`` in a child and SIGKILL it ``delay`` s after checkpoint ``step``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen = _wait_after_checkpoint(proc, out, step, delay)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the child ended by itself: {err[-2000:]!r}"
    assert seen, "the checkpoint never appeared"  # (pruning may have removed it since)
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"


def _kill_plan(name: str) -> tuple[int, float, str]:
    """(checkpoint to kill after, extra delay, a description that replays it)."""
    seed = int(os.environ.get("CRASH_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    kill_step, delay = rng.randint(2, MAX_STEPS - 4), rng.uniform(0.0, 0.15)
    return (
        kill_step,
        delay,
        f"{name}: killed {delay:.3f}s after checkpoint {kill_step} (CRASH_SEED={seed})",
    )


def _checkpointed(model: str) -> list[str]:
    """The settings every kill test runs with: a checkpoint each step, fp32, one seed."""
    return [f"model={model}", f"max_steps={MAX_STEPS}", "save_steps=1", f"keep_last={KEEP_LAST}",
            "seed=3", "bf16=false"]  # fmt: skip


def _assert_resumed_as_straight(straight: Path, killed: Path, name: str, where: str) -> None:
    """The resumed run's weights and metrics are the uninterrupted run's, bit for bit, and
    only the last ``KEEP_LAST`` checkpoints are left, none half-written."""
    weights = ["model.safetensors"] + (["value_head.safetensors"] if name == "ppo" else [])
    for file in weights:
        expected, resumed = load_file(straight / file), load_file(killed / file)
        assert expected.keys() == resumed.keys(), where
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), f"{where}: {file} {key}"
    assert _metrics(killed) == _metrics(straight), where
    assert len(_metrics(straight)) >= MAX_STEPS
    kept = _checkpoints(killed)
    assert len(kept) == KEEP_LAST, (where, kept)  # older and half-written ones are gone
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")], where


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sigkill_then_resume_gives_identical_weights(
    name, tiny_model, sft_data, separable_prefs, tmp_path, capsys
):
    kill_step, delay, where = _kill_plan(name)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    recipe = _cases(sft_data, separable_prefs, prompts)[name]
    common = [*recipe, *_checkpointed(tiny_model)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run_here([*common, f"output_dir={straight}"], capsys)
    _kill_after_checkpoint([*common, f"output_dir={killed}"], killed, kill_step, delay)
    _run_here([*common, f"output_dir={killed}", "--resume"], capsys)

    _assert_resumed_as_straight(straight, killed, name, where)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants. torchrun starts each rank in a session of its
    own, so no one process group holds the whole job."""
    tree = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            listed = children.read_text().split()
        except OSError:  # the thread has ended
            continue
        for child in listed:
            tree += _process_tree(int(child))
    return tree


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _kill_job_after_checkpoint(args: list[str], out: Path, step: int, delay: float) -> None:
    """Start ``alignkit ARGS`` under torchrun (2 processes) and, ``delay`` s after
    checkpoint ``step`` appears, SIGKILL torchrun and both ranks together: all are stopped
    first, so no process sees another die and shuts down in order (torchrun would send
    the surviving rank SIGTERM)."""
    argv, env = torchrun_command(args)
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    seen = _wait_after_checkpoint(proc, out, step, delay)
    tree = _process_tree(proc.pid)
    _signal(tree, signal.SIGSTOP)
    tree = _process_tree(proc.pid)  # complete: nothing forks while stopped
    ranks = [p for p in tree[1:] if b"alignkit.cli" in _cmdline(p)]
    _signal(tree, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"torchrun ended by itself: {err[-2000:]!r}"
    assert len(ranks) == 2, (tree, err[-2000:])
    deadline = time.monotonic() + 30
    while not all(_gone(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in tree), "a rank outlived the kill"
    assert seen, "the checkpoint never appeared"
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _run_job(args: list[str], where: str) -> None:
    """``alignkit ARGS`` under torchrun (2 processes), to the end."""
    argv, env = torchrun_command(args)
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"{where}: {result.stderr[-3000:]}"


FSDP_CASES = ["ppo", "dpo"]


@pytest.mark.parametrize("name", FSDP_CASES)
def test_sigkill_of_a_two_process_fsdp_run_then_resume_gives_identical_weights(
    name, tiny_model, separable_prefs, tmp_path
):
    """torchrun, 2 processes, ``distributed=fsdp`` (full weights): PPO (value head,
    adaptive KL controller, running reward moments, rollout seeds) and DPO. The job is
    SIGKILLed after a random checkpoint, resumed with ``--resume`` on 2 processes, and
    ends with the weights and metrics of the uninterrupted 2-process run, bit for bit."""
    kill_step, delay, where = _kill_plan(name)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    sharded = {"distributed": "fsdp", "lora.r": 0, "lr": 3e-4}
    recipe = {
        "ppo": _online(
            "ppo",
            prompts,
            prompts_per_step=4,  # 2 per rank
            epochs=2,
            num_minibatches=2,
            kl_coef=0.05,
            kl_target=0.01,
            kl_horizon=50,
            reward_norm="true",
            **sharded,
        ),
        "dpo": _offline("dpo", str(separable_prefs), "distributed=fsdp", "lora.r=0"),
    }[name]
    common = [*recipe, *_checkpointed(tiny_model)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run_job([*common, f"output_dir={straight}"], where)
    _kill_job_after_checkpoint([*common, f"output_dir={killed}"], killed, kill_step, delay)
    _run_job([*common, f"output_dir={killed}", "--resume"], where)

    _assert_resumed_as_straight(straight, killed, name, where)
    start = load_file(Path(tiny_model) / "model.safetensors")
    trained = load_file(straight / "model.safetensors")
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained


def test_ppo_checkpoint_holds_value_head_kl_controller_and_rollout_seed(
    tiny_model, tmp_path, capsys
):
    """What a PPO resume restores besides the policy: the value head's weights, the
    adaptive KL coefficient as it moved, the running reward moments and the next step's
    sampling seed (the rollout RNG is a function of (seed, step))."""
    from alignkit.recipes.online import rollout_seed

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "ppo"
    args = _cases(Path(), Path(), prompts)["ppo"]
    _run_here(
        [*args, f"model={tiny_model}", f"output_dir={out}", "max_steps=3", "save_steps=1"],
        capsys,
    )
    checkpoint = out / "checkpoints" / "step-000002"
    weights = load_file(checkpoint / "model.safetensors")
    assert {"critic.linear.weight", "critic.linear.bias"} <= weights.keys()
    assert weights["critic.linear.weight"].abs().sum() > 0  # trained away from its zero init
    extra = torch.load(checkpoint / "state.pt", weights_only=False)["extra"]
    with (out / "metrics.csv").open() as handle:
        rows = {int(r["step"]): r for r in csv.DictReader(handle)}
    # the controller's value after step 2 is the coefficient step 3 used
    assert extra["kl_controller"]["value"] == pytest.approx(float(rows[3]["kl_coef"]), rel=1e-12)
    assert extra["kl_controller"]["value"] != 0.05  # it moved from kl_coef
    assert extra["reward_stats"]["count"] == 2 * 2 * 2  # 2 steps x 2 prompts x 2 samples
    assert extra["next_rollout_seed"] == rollout_seed(0, 3)


_KILL_DURING = """
import os, signal, sys
import torch
from alignkit.training import checkpoint

out, when = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
for step in (1, 2, 3):
    with torch.no_grad():
        model.weight.fill_(float(step))
    if step == 3:
        die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        if when == "write":  # the weights are in the staging directory, state.pt is not
            checkpoint.torch.save = die
        else:  # the new checkpoint is in place; pruning the oldest is under way
            checkpoint.shutil.rmtree = die
    checkpoint.save_checkpoint(out, step, model, optimizer, scheduler, keep_last=2)
"""


@pytest.mark.parametrize("when", ["write", "prune"])
def test_a_kill_inside_save_checkpoint_leaves_the_previous_ones_valid(when, tmp_path):
    """SIGKILL while checkpoint 3 is being written (or while checkpoint 1 is being pruned):
    the complete checkpoints still load, the debris is never listed, and the next save
    sweeps it away."""
    from alignkit.training.checkpoint import (
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        save_checkpoint,
    )

    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_DURING, str(out), when], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    debris = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert debris, "the kill left nothing half-done: it came too late"
    expected = ["step-000001", "step-000002"] if when == "write" else ["step-000002", "step-000003"]
    assert [p.name for p in list_checkpoints(out)] == expected
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step, _ = load_checkpoint(latest_checkpoint(out), model, optimizer, scheduler)
    assert step == int(expected[-1][-1])
    assert torch.equal(model.weight, torch.full((4, 4), float(step)))
    save_checkpoint(out, 4, model, optimizer, scheduler, keep_last=2)
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == [expected[-1], "step-000004"]
