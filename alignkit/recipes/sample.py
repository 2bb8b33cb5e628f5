"""Sample k completions per prompt (a task's or a JSONL file's), optionally scored, to JSONL."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import check, doc
from alignkit.data.formats import read_rows
from alignkit.data.tokenize import encode_prompt
from alignkit.data.validation import prompt_value, require
from alignkit.errors import InputError
from alignkit.models import (
    DEVICE_HELP,
    EMBEDDED_MODEL,
    load_sampler,
    load_tokenizer,
    resolve_device,
)
from alignkit.rewards import ENSEMBLE_MODES, build_reward
from alignkit.rollout import SamplingParams, generate
from alignkit.tasks import DEFAULT_TASK, Prompt, get_task


@dataclass
class Config:
    """``alignkit sample``: one output row per prompt, ``{"prompt", "completions", "scores"}``."""

    model: str = doc("policy: HF directory, hub id, or smollm2-135m-instruct", EMBEDDED_MODEL)
    task: str = doc("built-in task whose prompts are sampled (unless data is set)", DEFAULT_TASK)
    split: str = doc("the task's prompt split: train or eval", "eval")
    data: str | None = doc("JSONL file of prompts (field prompt: string or chat messages)", None)
    limit: int = doc("sample only the first N prompts; 0 = all", 0)
    k: int = doc("completions per prompt", 4)
    max_new_tokens: int = doc("most tokens per completion", 64)
    temperature: float = doc("sampling temperature; 0 = greedy", 1.0)
    top_p: float = doc("nucleus sampling mass; 1 = off", 1.0)
    top_k: int = doc("sample among the k most likely tokens; 0 = off", 0)
    seed: int = doc("random seed (batch b uses seed + b)", 0)
    batch_size: int = doc("prompts per generation batch (batch_size * k rows)", 8)
    reward: list[str] = doc("score with: reward model DIR, module:function, task:NAME, a list", [])
    ensemble: str = doc("how a list of rewards combines: mean, min, mean_minus_std", "mean")
    output: str = doc("output JSONL file", "samples.jsonl")
    device: str = doc(DEVICE_HELP, "auto")

    def validate(self) -> None:
        resolve_device(self.device)
        check(self.k >= 1, "k", f"must be at least 1, got {self.k}")
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        check(self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")
        check(
            self.split in ("train", "eval"), "split", f"must be train or eval, got {self.split!r}"
        )
        check(self.ensemble in ENSEMBLE_MODES, "ensemble", f"must be one of {ENSEMBLE_MODES}")
        check(bool(self.output.strip()), "output", "is empty")
        self.sampling_params(seed_offset=0).validate()

    def sampling_params(self, seed_offset: int) -> SamplingParams:
        return SamplingParams(
            self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed + seed_offset
        )


def read_prompts(path: str) -> list[Prompt]:
    """The ``prompt`` of every row of a JSONL file (strings or chat messages), validated."""
    if not Path(path).expanduser().is_file():
        raise InputError("file not found", path=path)
    return [prompt_value(row, "prompt", require(row, "prompt")) for row in read_rows(path)]


def load_prompts(config: Config) -> list[Prompt]:
    """The prompts to sample: the data file's if given, else the task split's; then ``limit``."""
    prompts = (
        read_prompts(config.data) if config.data else get_task(config.task).prompts(config.split)
    )
    return prompts[: config.limit] if config.limit else prompts


def _complete_lines(partial: Path) -> list[str]:
    """The lines of a partial output up to the first torn (unparseable) one."""
    complete = []
    for line in partial.read_text().split("\n"):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        complete.append(line)
    return complete


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    # 0. validate everything before any compute
    output = Path(config.output).expanduser()
    if output.exists() and not overwrite:
        raise InputError("exists; pass --overwrite to replace it", path=str(output), field="output")
    if output.is_dir():
        raise InputError("is a directory, not a file", path=str(output), field="output")
    prompts = load_prompts(config)
    if not prompts:
        raise InputError("no prompts to sample", path="config", field="limit")
    tokenizer = load_tokenizer(config.model)
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    device = resolve_device(config.device)
    reward = (
        build_reward(config.reward, tokenizer, ensemble=config.ensemble, device=device)
        if config.reward
        else None
    )
    model = load_sampler(config.model, device=device)  # frozen, weights packed once
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    # resume keeps whole batches only, so the rest is sampled with the same seeds
    done = _complete_lines(partial) if resume and partial.is_file() else []
    start = len(done) - len(done) % config.batch_size
    partial.write_text("".join(line + "\n" for line in done[:start]))

    # 1. sample batch by batch, 2. score, 3. append rows
    started, tokens = time.time(), 0
    with partial.open("a") as handle:
        for first in range(start, len(prompts), config.batch_size):
            batch = list(range(first, min(first + config.batch_size, len(prompts))))
            params = config.sampling_params(seed_offset=first // config.batch_size)
            rollout = generate(model, tokenizer, [prompt_ids[i] for i in batch], params, config.k)
            tokens += int(rollout.completion_lengths.sum())
            row_prompts = [prompts[batch[int(i)]] for i in rollout.prompt_index]
            scores = reward(row_prompts, rollout.completions) if reward is not None else None
            for position, index in enumerate(batch):
                rows = slice(position * config.k, (position + 1) * config.k)
                record: dict[str, Any] = {
                    "prompt": prompts[index],
                    "completions": rollout.completions[rows],
                }
                if scores is not None:
                    record["scores"] = [round(float(s), 6) + 0.0 for s in scores[rows]]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            rate = tokens / (time.time() - started)
            print(f"sample: {batch[-1] + 1}/{len(prompts)} prompts, {rate:.1f} tok/s")
    partial.replace(output)
    summary = {
        "prompts": len(prompts),
        "completions": len(prompts) * config.k,
        "output": str(output),
    }
    if reward is not None:
        with output.open() as handle:
            all_scores = [s for line in handle for s in json.loads(line)["scores"]]
        summary["mean_score"] = float(torch.tensor(all_scores).mean())
        print(f"sample: mean score {summary['mean_score']:.4f}")
    return summary
