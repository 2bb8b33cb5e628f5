"""Reward sources behind one interface: reward model, classifier, function, task gold, ensemble."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignkit.data.tokenize import encode_completion
from alignkit.errors import InputError
from alignkit.rewards import (
    ClassifierReward,
    Ensemble,
    FunctionReward,
    RewardModel,
    build_reward,
    combine,
)
from alignkit.tasks.sentiment import vader_compound

PROMPTS = ["This movie was", [{"role": "user", "content": "Name a fruit."}], "The plot"]
COMPLETIONS = [" wonderful and moving.", "An apple.", " dragged on and on"]


def _save_classifier(tiny_model: str, tokenizer, out: Path, num_labels: int, **config) -> Path:
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=num_labels, dtype=torch.float32, **config
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.05)  # a head that separates texts
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model, tokenizer, tmp_path_factory) -> Path:
    return _save_classifier(tiny_model, tokenizer, tmp_path_factory.mktemp("rm"), 1)


@pytest.fixture(scope="module")
def classifier_dir(tiny_model, tokenizer, tmp_path_factory) -> Path:
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    out = tmp_path_factory.mktemp("clf")
    return _save_classifier(
        tiny_model, tokenizer, out, 2, id2label=labels, label2id={v: k for k, v in labels.items()}
    )


@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def short(prompts, completions):\n"
        "    return [1.0]\n"
        "def broken(prompts, completions):\n"
        "    return [float('nan')] * len(completions)\n"
        "def constant(prompts, completions):\n"
        "    return [2.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_reward_model_reads_the_score_at_the_eos(reward_model_dir, tokenizer):
    reward = build_reward(str(reward_model_dir), bf16=False)
    assert isinstance(reward, RewardModel)
    scores = reward(PROMPTS, COMPLETIONS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for prompt, completion, got in zip(PROMPTS, COMPLETIONS, scores, strict=True):
        answer = completion if isinstance(prompt, str) else [
            {"role": "assistant", "content": completion}
        ]  # fmt: skip
        prompt_ids, completion_ids = encode_completion(tokenizer, prompt, answer)
        ids = torch.tensor([prompt_ids + completion_ids])
        assert ids[0, -1] == tokenizer.eos_token_id  # scored at the EOS the RM trained on
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
            expected = model.score(hidden)[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # batched (right-padded) and one by one agree
    singles = torch.cat([reward([p], [c]) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    torch.testing.assert_close(scores, singles, atol=1e-5, rtol=1e-5)
    assert scores.unique().numel() == 3


def test_reward_model_renders_chat_prompts_with_the_template(reward_model_dir, tokenizer):
    reward = RewardModel(reward_model_dir, bf16=False)
    ids = reward.token_ids(PROMPTS[1], "An apple.")
    rendered = tokenizer.decode(ids)
    assert rendered.startswith("<|im_start|>") and "Name a fruit." in rendered
    assert rendered.endswith("An apple.<|im_end|>")
    assert tokenizer.decode(reward.token_ids("Hi", " there")) == "Hi there<|im_end|>"


def test_classifier_probability_and_logit(classifier_dir):
    positive = build_reward(f"classifier:{classifier_dir}:POSITIVE", bf16=False)
    negative = build_reward(f"classifier:{classifier_dir}:negative", bf16=False)
    logit = build_reward(f"classifier:{classifier_dir}:1:logit", bf16=False)
    assert isinstance(positive, ClassifierReward) and positive.label_index == 1
    p_pos, p_neg = positive(PROMPTS, COMPLETIONS), negative(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(p_pos + p_neg, torch.ones(3))
    assert ((p_pos > 0) & (p_pos < 1)).all()
    logits = logit(PROMPTS, COMPLETIONS)
    # probability of class 1 = sigmoid(logit_1 - logit_0)
    logit_0 = build_reward(f"classifier:{classifier_dir}:0:logit", bf16=False)(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(p_pos, torch.sigmoid(logits - logit_0), atol=1e-5, rtol=1e-5)


def test_function_reward(reward_module):
    reward = build_reward(f"{reward_module}:length")
    assert isinstance(reward, FunctionReward)
    assert reward(PROMPTS, COMPLETIONS).tolist() == [float(len(c)) for c in COMPLETIONS]
    with pytest.raises(InputError, match="returned 1 values for 3 completions"):
        build_reward(f"{reward_module}:short")(PROMPTS, COMPLETIONS)
    with pytest.raises(InputError, match="NaN"):
        build_reward(f"{reward_module}:broken")(PROMPTS, COMPLETIONS)


def test_task_gold_reward_is_vader():
    reward = build_reward("task:sentiment")
    got = reward(["This movie was", "This movie was"], [" wonderful, I loved it!", " awful."])
    expected = [
        vader_compound("This movie was wonderful, I loved it!"),
        vader_compound("This movie was awful."),
    ]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert got[0] > 0.5 and got[1] < -0.4


def test_ensemble_math_by_hand():
    rewards = torch.tensor([[1.0, 4.0, -2.0], [3.0, 0.0, -2.0]])  # (M=2, N=3)
    torch.testing.assert_close(combine(rewards, "mean"), torch.tensor([2.0, 2.0, -2.0]))
    torch.testing.assert_close(combine(rewards, "min"), torch.tensor([1.0, 0.0, -2.0]))
    # population std over members: |a - b| / 2 = [1, 2, 0]
    torch.testing.assert_close(
        combine(rewards, "mean_minus_std", std_coef=0.5), torch.tensor([1.5, 1.0, -2.0])
    )


def test_ensemble_from_a_list_of_specs(reward_module):
    specs = [f"{reward_module}:length", f"{reward_module}:constant"]
    lengths = torch.tensor([float(len(c)) for c in COMPLETIONS])
    mean = build_reward(specs)
    assert isinstance(mean, Ensemble)
    torch.testing.assert_close(mean(PROMPTS, COMPLETIONS), (lengths + 2) / 2)
    pessimistic = build_reward(specs, ensemble="mean_minus_std", std_coef=2.0)
    expected = (lengths + 2) / 2 - 2.0 * (lengths - 2).abs() / 2
    torch.testing.assert_close(pessimistic(PROMPTS, COMPLETIONS), expected)
    assert pessimistic.member_rewards(PROMPTS, COMPLETIONS).shape == (2, 3)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "is empty"),
        ("./no/such/dir", "not found"),
        ("nothing-here", "is not a directory, module:function"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("os:no_such_function", "has no function"),
        ("task:nope", "unknown task"),
        ("classifier:/no/such/dir:POSITIVE", "not found"),
        ("classifier:onlydir", "expected classifier:DIR:LABEL"),
    ],
)
def test_bad_specs_name_the_reward_field(spec, message):
    with pytest.raises(InputError, match=message) as err:
        build_reward(spec)
    assert err.value.field == "reward"
    assert "\n" not in str(err.value)


def test_wrong_kind_of_model_directory(reward_model_dir, classifier_dir, tiny_model):
    with pytest.raises(InputError, match="has 2 outputs"):
        build_reward(str(classifier_dir))
    with pytest.raises(InputError, match="not a sequence classifier"):
        build_reward(tiny_model)
    with pytest.raises(InputError, match="has no class 'NEUTRAL'"):
        build_reward(f"classifier:{classifier_dir}:NEUTRAL")
    with pytest.raises(InputError, match="ensemble"):
        build_reward([str(reward_model_dir), "task:sentiment"], ensemble="median")
