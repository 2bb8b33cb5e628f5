"""A toy task for the online-recipe tests: prompts, a reward the tiny model can learn, helpers.

The tiny random model samples almost uniformly from 49k tokens, so a reward on a handful
of token ids would never be seen. :func:`even_tokens` pays for the share of completion
tokens with an even id: half of the vocabulary, a dense signal. With ``top_k=2`` sampling
each position is a choice between two candidates, which a few policy-gradient steps can
reorder (without it the near-uniform softmax needs hundreds of steps). The runs train
LoRA adapters: with full weights Adam moves every row of the tied embedding by ~lr each
step (the softmax normaliser gives each a tiny gradient), and after a few steps at a toy
learning rate the inputs drift and the learned preference collapses.
Used as ``reward=tests.online_toy:even_tokens``.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path

REWARD = "tests.online_toy:even_tokens"
PROMPTS = [
    "The weather today",
    "My favourite food is",
    "Once upon a time",
    "The best way to learn",
    "In the morning I",
    "A good movie should",
    "The city at night",
    "Music makes me",
]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from alignkit.models import load_tokenizer, tiny_model_dir

    return load_tokenizer(str(tiny_model_dir()))


def even_tokens(prompts: Sequence[object], completions: Sequence[str]) -> list[float]:
    """Share of the completion's (re-tokenized) tokens whose id is even; 0 when empty."""
    tokenizer = _tokenizer()
    scores = []
    for completion in completions:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        scores.append(sum(1 for i in ids if i % 2 == 0) / len(ids) if ids else 0.0)
    return scores


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def toy_overrides(model: str, prompts: Path, output_dir: Path, **extra: object) -> list[str]:
    """key=value settings of a small, fast run on the toy task (fp32, no evaluation)."""
    settings = {
        "model": model,
        "data": str(prompts),
        "task": '""',  # YAML for the empty string: no task
        "reward": REWARD,
        "output_dir": str(output_dir),
        "prompts_per_step": 8,
        "samples_per_prompt": 4,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_k": 2,
        "lora.r": 8,
        "lr": 3e-3,
        "lr_schedule": "constant",
        "eval_prompts": 0,
        "bf16": "false",
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def read_metrics(output_dir: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv from step 1 on (step 0 is the evaluation before training)."""
    with (Path(output_dir) / "metrics.csv").open() as handle:
        rows = [
            {k: float(v) if v else float("nan") for k, v in r.items()}
            for r in csv.DictReader(handle)
        ]
    return [row for row in rows if row["step"] >= 1]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
