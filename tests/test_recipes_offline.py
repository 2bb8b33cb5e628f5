"""Offline recipes on a tiny random Llama: SFT, reward model, the DPO family.

Each trains a few steps and must give a finite loss and moved parameters; on a
separable preference set the reward model and DPO must reach 90% accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.config import load_config
from alignkit.recipes import dpo, reward, sft

from .conftest import write_jsonl


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _moved(before: dict, after: dict) -> float:
    return max(
        (after[k].float() - before[k].float()).abs().max().item() for k in before if k in after
    )


def _rows(path) -> list[dict]:
    with open(path / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_sft_learns_completions(tiny_model, sft_data, tmp_path):
    out = tmp_path / "sft"
    config = load_config(
        sft.Config,
        "sft",
        None,
        [
            f"model={tiny_model}",
            f"data={sft_data}",
            f"output_dir={out}",
            "max_steps=12",
            "batch_size=4",
            "lr=3e-3",
            "eval_fraction=0.25",
        ],
    )
    summary = sft.run(config)
    rows = _rows(out)
    assert len(rows) == 12
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < first * 0.8, (first, last)
    assert summary["train_rows"] == 12 and summary["eval_rows"] == 4
    assert "eval/loss" in rows[-1]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert _moved(_weights(Path(tiny_model)), _weights(out)) > 1e-4
    assert (out / "alignkit_config.yaml").read_text().count("lr: 0.003") == 1
    assert any((out / "tensorboard").iterdir())


def test_reward_model_separates_pairs(tiny_model, separable_prefs, tmp_path):
    out = tmp_path / "rm"
    config = load_config(
        reward.Config,
        "reward",
        None,
        [
            f"model={tiny_model}",
            f"data={separable_prefs}",
            f"output_dir={out}",
            "max_steps=30",
            "batch_size=8",
            "lr=2e-3",
            "eval_fraction=0.25",
        ],
    )
    summary = reward.run(config)
    assert summary["eval/rewards/accuracy"] >= 0.9
    assert torch.isfinite(torch.tensor(summary["loss"]))
    # The saved directory is a plain sequence classifier that scores chosen above rejected.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer(str(out))
    batch = tokenizer(
        [
            "Question 1: do you like rain?yes yes yes, rain",
            "Question 1: do you like rain?no no no, rain",
        ],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
    assert scores[0] > scores[1]


def test_reward_centering_pulls_scores_to_zero(tiny_model, separable_prefs, tmp_path):
    base = [
        f"model={tiny_model}",
        f"data={separable_prefs}",
        "max_steps=15",
        "batch_size=8",
        "lr=2e-3",
    ]
    plain = reward.run(
        load_config(reward.Config, "reward", None, base + [f"output_dir={tmp_path / 'a'}"])
    )
    centered = reward.run(
        load_config(
            reward.Config,
            "reward",
            None,
            base + [f"output_dir={tmp_path / 'b'}", "center_coef=1.0"],
        )
    )
    assert (
        abs(centered["rewards/mean"]) < abs(plain["rewards/mean"])
        or abs(centered["rewards/mean"]) < 0.05
    )


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo", "orpo", "rpo"])
def test_dpo_family_trains(loss, tiny_model, separable_prefs, tmp_path):
    out = tmp_path / loss
    config = load_config(
        dpo.Config,
        "dpo",
        None,
        [
            f"model={tiny_model}",
            f"data={separable_prefs}",
            f"output_dir={out}",
            "max_steps=4",
            "batch_size=4",
            "lr=1e-3",
            f"loss={loss}",
        ],
    )
    summary = dpo.run(config)
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in _rows(out))
    assert _moved(_weights(Path(tiny_model)), _weights(out)) > 1e-5
    assert summary["loss"] == pytest.approx(float(_rows(out)[-1]["loss"]))


def test_dpo_reaches_90_percent_and_reuses_reference_cache(tiny_model, separable_prefs, tmp_path):
    args = [
        f"model={tiny_model}",
        f"data={separable_prefs}",
        "max_steps=25",
        "batch_size=8",
        "lr=2e-3",
        "beta=0.5",
        "eval_fraction=0.25",
    ]
    first = dpo.run(load_config(dpo.Config, "dpo", None, args + [f"output_dir={tmp_path / 'a'}"]))
    assert first["eval/rewards/accuracy"] >= 0.9
    second = dpo.run(load_config(dpo.Config, "dpo", None, args + [f"output_dir={tmp_path / 'b'}"]))
    assert second["reference_from_cache"] is True
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-4)


def test_dpo_first_step_has_zero_margin(tiny_model, separable_prefs, tmp_path):
    """At step 1 the policy is the reference: h = 0, loss = log 2, implicit margin 0."""
    out = tmp_path / "d"
    dpo.run(
        load_config(
            dpo.Config,
            "dpo",
            None,
            [
                f"model={tiny_model}",
                f"data={separable_prefs}",
                f"output_dir={out}",
                "max_steps=1",
                "batch_size=4",
                "bf16=false",
            ],
        )
    )
    row = _rows(out)[0]
    assert float(row["loss"]) == pytest.approx(0.693147, abs=1e-4)
    assert abs(float(row["rewards/margin"])) < 1e-4


def test_kto_on_unpaired_data(tiny_model, tmp_path):
    rows = [
        {"prompt": f"Q{i}: like tea?", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "kto"
    summary = dpo.run(
        load_config(
            dpo.Config,
            "dpo",
            None,
            [
                f"model={tiny_model}",
                f"data={data}",
                f"output_dir={out}",
                "max_steps=6",
                "batch_size=4",
                "lr=2e-3",
                "loss=kto",
            ],
        )
    )
    losses = [float(r["loss"]) for r in _rows(out)]
    assert all(0 <= v <= 1 for v in losses)  # each KTO term is lambda*(1 - sigmoid) in [0, 1]
    assert summary["fraction_desirable"] == pytest.approx(0.5, abs=0.5)


def test_dpo_with_lora_uses_the_base_as_reference(tiny_model, separable_prefs, tmp_path):
    out = tmp_path / "lora"
    summary = dpo.run(
        load_config(
            dpo.Config,
            "dpo",
            None,
            [
                f"model={tiny_model}",
                f"data={separable_prefs}",
                f"output_dir={out}",
                "max_steps=3",
                "batch_size=4",
                "lr=5e-3",
                "lora.r=4",
                "bf16=false",
            ],
        )
    )
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model with LoRA merged in
    assert _moved(_weights(Path(tiny_model)), merged.state_dict()) > 1e-6
    assert torch.isfinite(torch.tensor(summary["loss"]))


def test_reward_model_on_real_hh_rows_skips_the_invalid_ones(tiny_model, tmp_path, capsys):
    """The HH split has 4 rows whose chosen reply is empty: invalid_rows=skip counts them."""
    import gzip

    from .conftest import SHARED_DATA

    lines = gzip.open(SHARED_DATA / "hh-rlhf-harmless-base.jsonl.gz", "rt").read().splitlines()
    subset = tmp_path / "hh.jsonl"
    subset.write_text("\n".join(lines[500:540]) + "\n")  # holds file line 523 (an empty reply)
    args = [
        f"model={tiny_model}",
        f"data={subset}",
        "max_steps=2",
        "batch_size=4",
        "max_length=128",
    ]
    with pytest.raises(Exception) as err:
        reward.run(
            load_config(reward.Config, "reward", None, [*args, f"output_dir={tmp_path / 'a'}"])
        )
    assert "hh.jsonl:23: field 'chosen' has an empty last 'Assistant:' reply" in str(err.value)
    summary = reward.run(
        load_config(
            reward.Config,
            "reward",
            None,
            [*args, f"output_dir={tmp_path / 'b'}", "invalid_rows=skip", "eval_fraction=0"],
        )
    )
    assert summary["train_rows"] == 39
    assert "skipped 1 invalid rows" in capsys.readouterr().err
