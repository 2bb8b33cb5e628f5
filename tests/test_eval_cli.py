"""``alignkit eval`` on the tiny model: the JSON's fields, numbers in range, self-comparison."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.cli import main
from alignkit.eval.kl import sequence_kl
from alignkit.rollout import SamplingParams, generate

from .conftest import write_jsonl

PROMPTS = [
    "The movie was",
    "I found the plot",
    "The acting in this film",
    "This sequel",
    "The soundtrack",
    "My friends and I thought the ending",
]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model) -> str:
    """A tiny random reward model (sequence classifier with one output)."""
    from alignkit.models import load_reward_backbone, load_tokenizer

    folder = tmp_path_factory.mktemp("rm")
    load_reward_backbone(tiny_model).save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def nudged_model(tmp_path_factory, tiny_model) -> str:
    """The tiny model with its weights perturbed: a policy that differs from the reference."""
    from alignkit.models import load_policy, load_tokenizer

    folder = tmp_path_factory.mktemp("nudged")
    model = load_policy(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p, "split": "eval"} for p in PROMPTS]
    )


def _check_win_rate(block: dict, n: int) -> None:
    assert block["n"] == n == block["wins"] + block["ties"] + block["losses"]
    assert 0.0 <= block["low"] <= block["win_rate"] <= block["high"] <= 1.0
    assert 0.0 <= block["bootstrap_low"] <= block["bootstrap_high"] <= 1.0
    expected = (block["wins"] + 0.5 * block["ties"]) / n
    assert block["win_rate"] == pytest.approx(expected)
    assert block["tie_rate"] == pytest.approx(block["ties"] / n)


def test_eval_self_and_nudged_policy(
    tmp_path, capsys, tiny_model, nudged_model, tiny_reward_model, prompts_file
):
    output = tmp_path / "eval.json"
    code, out, err = run_cli(
        [
            "eval", "--prompts", str(prompts_file), "--gold", "alignkit.tasks.sentiment:gold",
            "--policy", f"self={tiny_model}", "--policy", f"nudged={nudged_model}",
            "--reference", tiny_model, "--reward", tiny_reward_model,
            "--judge", f"local:{tiny_model}", "--samples-per-prompt", "3",
            "--max-new-tokens", "10", "--bootstrap", "500", "--output", str(output),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "gold win rate" in out and "nudged" in out
    result = json.loads(output.read_text())
    assert result["task"] == "custom" and result["num_prompts"] == len(PROMPTS)
    n = len(PROMPTS) * 3
    reference = result["reference_metrics"]
    assert len(reference["samples"]) == n
    assert reference["gold"]["low"] <= reference["gold"]["estimate"] <= reference["gold"]["high"]
    by_name = {p["name"]: p for p in result["policies"]}
    assert set(by_name) == {"self", "nudged"}
    for policy in by_name.values():
        _check_win_rate(policy["gold_win_rate"], n)
        _check_win_rate(policy["reward_win_rate"], n)
        _check_win_rate(policy["judge_win_rate"], n)
        assert 0.0 <= policy["judge_win_rate"]["consistency_rate"] <= 1.0
        assert -1.0 <= policy["gold"]["estimate"] <= 1.0
        assert 1 <= policy["length"]["mean_tokens"] <= 10
        assert 0.0 < policy["distinct_1"] <= 1.0 and 0.0 < policy["distinct_2"] <= 1.0
        assert len(policy["samples"]) == n
        assert all(-1.0 <= s["gold"] <= 1.0 and 1 <= s["tokens"] <= 10 for s in policy["samples"])
        gain = policy["gold_gain"]
        assert gain["low"] <= gain["estimate"] <= gain["high"]
    # a policy compared with itself: win rate near 0.5, KL zero up to numerics
    self_policy = by_name["self"]
    assert 0.2 <= self_policy["gold_win_rate"]["win_rate"] <= 0.8
    assert self_policy["gold_win_rate"]["low"] <= 0.5 <= self_policy["gold_win_rate"]["high"]
    assert abs(self_policy["kl"]["k1"]) < 1e-4 and abs(self_policy["kl"]["k3"]) < 1e-4
    # the nudged policy is measurably away from the reference, and k3 is never negative
    nudged = by_name["nudged"]["kl"]
    assert nudged["k3"] > 0.01 and nudged["low"] <= nudged["k3"] <= nudged["high"]
    assert all(math.isfinite(s["kl_k1"]) for s in by_name["nudged"]["samples"])


def test_sequence_kl_matches_exact_kl_on_one_token(tiny_model, nudged_model):
    """With one-token completions, KL(pi||ref) is a sum over the vocabulary: k1 and k3
    averaged over many samples must approach it."""
    from alignkit.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(tiny_model, padding_side="left")
    policy, reference = load_policy(nudged_model).eval(), load_policy(tiny_model).eval()
    prompt_ids = [tokenizer("The movie was")["input_ids"]]
    rollout = generate(
        policy, tokenizer, prompt_ids, SamplingParams(max_new_tokens=1, seed=3), 4000, bf16=False
    )
    estimate = sequence_kl(policy, reference, rollout, bf16=False)
    with torch.no_grad():
        ids = torch.tensor(prompt_ids)
        log_p = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
        log_q = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    assert exact > 0.05
    assert estimate.k1 == pytest.approx(exact, rel=0.1)
    assert estimate.k3 == pytest.approx(exact, rel=0.1)
    assert (estimate.k3_per_sample >= 0).all()
    assert np.std(estimate.k3_per_sample) < np.std(estimate.k1_per_sample)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "no-equals-sign"], "expected NAME=DIR"),
        (["--policy", "a=/nonexistent/dir"], "model directory not found"),
        (["--policy", "TINY", "--samples-per-prompt", "0"], "samples_per_prompt"),
        (["--policy", "TINY", "--judge", "magic:thing"], "expected local:DIR"),
        (["--policy", "TINY", "--prompts", "PROMPTS"], "--gold"),
        (["--policy", "TINY", "--task", "nope"], "unknown task"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra, message, tmp_path, capsys, tiny_model, prompts_file):
    extra = [
        f"p={tiny_model}" if x == "TINY" else str(prompts_file) if x == "PROMPTS" else x
        for x in extra
    ]
    args = ["eval", "--reference", tiny_model, "--output", str(tmp_path / "e.json"), *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e.json").exists()


def test_completions_files_are_scored_as_a_system(tmp_path, capsys, tiny_model, prompts_file):
    """--completions: e.g. two best-of-4 runs as samples 0 and 1; gold of the given texts,
    the best-of-n KL bound, no policy needed; a prompt that differs is one line, exit 2."""
    from alignkit.tasks.sentiment import gold

    texts = [[f" a wonderful, great film {i}", f" an awful, boring mess {i}"] for i in range(6)]
    files = []
    for j in range(2):
        rows = [
            {"prompt": p, "completion": texts[i][j], "rewards": [0.1, 0.2, 0.3, 0.4]}
            for i, p in enumerate(PROMPTS)
        ]
        files.append(str(write_jsonl(tmp_path / f"bon{j}.jsonl", rows)))
    output = tmp_path / "eval.json"
    base = ["eval", "--prompts", str(prompts_file), "--gold", "alignkit.tasks.sentiment:gold",
            "--reference", tiny_model, "--samples-per-prompt", "2", "--max-new-tokens", "6",
            "--bootstrap", "200", "--output", str(output)]  # fmt: skip
    code, out, err = run_cli([*base, "--completions", "bon=" + ",".join(files)], capsys)
    assert code == 0, err
    (policy,) = json.loads(output.read_text())["policies"]
    assert policy["name"] == "bon"
    assert [s["completion"] for s in policy["samples"]] == [t for pair in texts for t in pair]
    expected = gold([p for p in PROMPTS for _ in range(2)], [t for pair in texts for t in pair])
    assert [s["gold"] for s in policy["samples"]] == pytest.approx(list(expected))
    assert policy["kl"]["k3"] is None
    assert policy["kl"]["upper_bound"] == pytest.approx(math.log(4) - 3 / 4)
    assert "<= 0.636" in out
    # one file gives one sample per prompt, but 2 are asked for; and a prompt that differs
    output.unlink()
    code, _, err = run_cli([*base, "--completions", f"bon={files[0]}"], capsys)
    assert code == 2 and "prompt 1 has 1 completions" in err and len(err.splitlines()) == 1
    rows = [json.loads(x) for x in open(files[1])]
    rows[2]["prompt"] = "something else"
    write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = run_cli([*base, "--completions", f"bon={files[0]},{tmp_path / 'bad.jsonl'}"],
                           capsys)  # fmt: skip
    assert code == 2 and "bad.jsonl:3" in err and "prompt" in err and len(err.splitlines()) == 1
    assert not output.exists()
