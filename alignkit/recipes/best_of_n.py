"""Best-of-n sampling: n completions per prompt from the policy, the reward's argmax kept.

The best-of-n policy pi_n draws n i.i.d. samples from pi and returns the one the reward
ranks first (ALGORITHMS.md section 5). The commonly quoted KL(pi_n || pi) = log n - (n-1)/n
is only an upper bound, tight when every completion is improbable under pi and loose for
peaked policies (Beirami et al., arXiv 2401.01879); the summary prints it as such.
Nothing is trained: :func:`best_of_n` is also a policy the evaluation and demo code call.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.config import check, doc, save_config
from alignkit.data.examples import Prompt
from alignkit.errors import InputError
from alignkit.models import (
    DEVICE_HELP,
    EMBEDDED_MODEL,
    bf16_supported,
    load_policy,
    load_tokenizer,
    resolve_device,
)
from alignkit.recipes.offline import console
from alignkit.recipes.online import (
    RewardFn,
    call_reward,
    encode_prompts,
    load_prompts,
    rollout_seed,
    task_gold,
)
from alignkit.rollout import Rollout, SamplingParams, generate, score
from alignkit.training.common import check_output_dir, prepare_output_dir, set_threads

KL_BOUND_NOTE = (
    "log n - (n-1)/n is only an upper bound on KL(best-of-n || policy) (arXiv 2401.01879)"
)


@dataclass
class Config:
    model: str = doc("policy: HF directory, hub id, or smollm2-135m-instruct", EMBEDDED_MODEL)
    task: str = doc("built-in task: its held-out prompts, and its gold judge", "sentiment")
    data: str = doc("prompts file (JSONL with a 'prompt' field); replaces the task's", "")
    reward: str = doc(
        "reward: RM directory | module:function | task:NAME | comma-separated list",
        "task:sentiment",
    )
    output_dir: str = doc("run directory: best_of_n.jsonl, summary.json", "runs/bon")
    n: int = doc("samples per prompt; the reward's argmax is kept", 8)
    max_prompts: int = doc("prompts used (the first ones); 0 = all", 32)
    prompts_per_batch: int = doc("prompts per generation batch (x n rows)", 8)
    max_new_tokens: int = doc("completion length limit (tokens)", 32)
    max_prompt_length: int = doc("prompt tokens kept (the first ones are dropped)", 128)
    temperature: float = doc("sampling temperature", 1.0)
    top_p: float = doc("nucleus sampling mass; 1 turns it off", 1.0)
    top_k: int = doc("sample among the k most likely tokens; 0 turns it off", 0)
    seed: int = doc("sampling seed", 0)
    bf16: Literal["auto", "true", "false"] = doc(
        "bf16 autocast: auto = where the CPU/GPU has it", "auto"
    )
    device: str = doc(DEVICE_HELP, "auto")

    def validate(self) -> None:
        resolve_device(self.device)
        check(bool(self.task or self.data), "data", "give a prompts file or a task")
        check(bool(self.reward.strip()), "reward", "is required")
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.max_prompts >= 0, "max_prompts", "must be >= 0")
        check(self.prompts_per_batch >= 1, "prompts_per_batch", "must be >= 1")
        check(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        self.sampling(0).validate()

    def sampling(self, batch: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=rollout_seed(self.seed, batch),
        )

    def use_bf16(self) -> bool:
        return self.bf16 == "true" or (
            self.bf16 == "auto" and bf16_supported(resolve_device(self.device))
        )


def kl_upper_bound(n: int) -> float:
    """log n - (n-1)/n: an upper bound on KL(pi_n || pi) in nats (arXiv 2401.01879)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def select_best(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B,), reward (B,)) of each row's maximum of ``rewards`` (B, n); ties -> first."""
    best_rewards, best_index = rewards.max(dim=1)
    return best_index, best_rewards


@dataclass
class BestOfN:
    """The n samples of each prompt, their rewards and the chosen one. B prompts."""

    samples: list[list[str]]  # B x n completions
    rewards: torch.Tensor  # (B, n)
    best_index: torch.Tensor  # (B,) long
    best_rewards: torch.Tensor  # (B,)
    finished: torch.Tensor  # (B, n) bool, the completion ended with EOS

    @property
    def completions(self) -> list[str]:
        """The chosen completion of each prompt."""
        return [row[int(i)] for row, i in zip(self.samples, self.best_index, strict=True)]


@dataclass
class ScoredSamples:
    """A rollout of n samples per prompt, scored. Row i*n + j = prompt i, sample j."""

    rollout: Rollout
    prompts: list[Prompt]  # N, the prompt of each row
    scores: torch.Tensor  # (N,) reward
    gold: torch.Tensor | None  # (N,) the task's gold score, when there is a judge


def sample_and_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int,
    reward_fn: RewardFn,
    bf16: bool | None = None,
    gold_fn: RewardFn | None = None,
    reward_name: str = "reward",
    first_row: int | None = None,
) -> ScoredSamples:
    """``n`` completions per prompt from ``model``, scored by ``reward_fn`` (and ``gold_fn``).

    ``first_row``: the global index of these prompts' first row (each row then samples
    from its own seed, see :func:`alignkit.rollout.generate`)."""
    # 1. sample
    rollout = generate(
        model, tokenizer, prompt_ids, params, num_samples=n, bf16=bf16, first_row=first_row
    )
    # 2. score, each completion with its own prompt
    # (the reward gets strings; its scores come back on the rollout's device)
    row_prompts = [prompts[int(i)] for i in rollout.prompt_index]
    device = rollout.input_ids.device
    scores = call_reward(reward_fn, row_prompts, rollout.completions, reward_name, device)
    gold = None
    if gold_fn is not None:
        gold = call_reward(gold_fn, row_prompts, rollout.completions, "gold", device)
    return ScoredSamples(rollout, row_prompts, scores, gold)


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module, rollout: Rollout, bf16: bool | None, temperature: float = 1.0
) -> torch.Tensor:
    """S(y), the summed completion log-probs of every rollout row, without gradients.  # (N,)"""
    was_training = model.training
    model.eval()
    try:
        logps = score(model, rollout, temperature=temperature, bf16=bf16).logps
    finally:
        model.train(was_training)
    return (logps * rollout.completion_mask).sum(-1)


def best_of_n(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    reward_fn: RewardFn,
    n: int,
    params: SamplingParams,
    *,
    max_prompt_length: int = 128,
    prompts_per_batch: int = 8,
    bf16: bool | None = None,
    reward_name: str = "reward",
) -> BestOfN:
    """Sample ``n`` completions per prompt, score them with ``reward_fn``, keep the argmax.

    Batch b of ``prompts_per_batch`` prompts samples with seed ``rollout_seed(params.seed,
    b)``, so the same inputs give the same result. ``reward_fn(prompts, completions)``
    receives each completion's own prompt.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length)
    samples: list[list[str]] = []
    rewards, finished = [], []
    for batch, start in enumerate(range(0, len(prompts), prompts_per_batch)):
        chunk = list(prompts[start : start + prompts_per_batch])
        batch_params = SamplingParams(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=rollout_seed(params.seed, batch),
        )
        # 1. sample n completions per prompt  2. score each with its own prompt
        scored = sample_and_score(
            model,
            tokenizer,
            chunk,
            prompt_ids[start : start + len(chunk)],
            batch_params,
            n,
            reward_fn,
            bf16,
            reward_name=reward_name,
        )
        rollout = scored.rollout
        rewards.append(scored.scores.cpu().view(len(chunk), n))
        finished.append(rollout.finished.cpu().view(len(chunk), n))
        samples.extend(rollout.completions[i * n : (i + 1) * n] for i in range(len(chunk)))
    all_rewards = torch.cat(rewards)
    # 3. keep the argmax per prompt
    best_index, best_rewards = select_best(all_rewards)
    return BestOfN(samples, all_rewards, best_index, best_rewards, torch.cat(finished))


def summarize(result: BestOfN, n: int, gold: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean reward of the chosen sample vs of a single sample, the gold scores, the KL bound.

    "Single sample" is the mean over all n samples: the expected reward of one draw.
    ``gold`` (B, n) is the task's gold score of every sample.
    """
    summary: dict[str, Any] = {
        "n": n,
        "prompts": len(result.samples),
        "reward/best_of_n": float(result.best_rewards.mean()),
        "reward/single_sample": float(result.rewards.mean()),
        "reward/gain": float(result.best_rewards.mean() - result.rewards.mean()),
        "kl_upper_bound": kl_upper_bound(n),
        "kl_note": KL_BOUND_NOTE,
        "eos_fraction": float(result.finished.float().mean()),
    }
    if gold is not None:
        chosen = gold.gather(1, result.best_index[:, None]).squeeze(1)
        summary["gold/best_of_n"] = float(chosen.mean())
        summary["gold/single_sample"] = float(gold.mean())
    return summary


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    started = time.time()
    set_threads()
    if resume:
        raise InputError("best-of-n trains nothing, so there is nothing to resume", field="resume")
    # 0. validate every input before any compute or any file is touched
    tokenizer = load_tokenizer(config.model)
    train_prompts, held_out = load_prompts(config.task, config.data)
    prompts = train_prompts if config.data or not held_out else held_out
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    from alignkit.rewards import build_reward

    device = resolve_device(config.device)
    reward_fn = build_reward(config.reward, device=device)
    gold_fn = task_gold(config.task, device)
    check_output_dir(config.output_dir, overwrite, resume=False)
    model = load_policy(config.model, device=device)
    model.requires_grad_(False)
    output_dir = prepare_output_dir(config.output_dir, overwrite, resume=False)

    # 1.-3. sample, score, keep the argmax
    result = best_of_n(
        model,
        tokenizer,
        prompts,
        reward_fn,
        config.n,
        config.sampling(0),
        max_prompt_length=config.max_prompt_length,
        prompts_per_batch=config.prompts_per_batch,
        bf16=config.use_bf16(),
        reward_name=config.reward,
    )
    # 4. gold score of every sample, when the task has a judge
    gold = None
    if gold_fn is not None:
        flat_prompts = [p for p in prompts for _ in range(config.n)]
        flat_samples = [c for row in result.samples for c in row]
        gold = call_reward(gold_fn, flat_prompts, flat_samples, "gold").view(-1, config.n)
    # 5. write the chosen completions and the summary
    with (output_dir / "best_of_n.jsonl").open("w") as handle:
        for i, prompt in enumerate(prompts):
            best = int(result.best_index[i])
            row = {
                "prompt": prompt,
                "completion": result.samples[i][best],
                "reward": float(result.best_rewards[i]),
                "index": best,
                "rewards": [float(r) for r in result.rewards[i]],
            }
            if gold is not None:
                row["gold"] = float(gold[i, best])
            handle.write(json.dumps(row) + "\n")
    summary = summarize(result, config.n, gold)
    summary["wall_seconds"] = round(time.time() - started, 2)
    save_config(config, output_dir / "alignkit_config.yaml")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    line = (
        f"best-of-{config.n} on {len(prompts)} prompts: reward {summary['reward/best_of_n']:.4g}"
        f" vs single sample {summary['reward/single_sample']:.4g}"
    )
    if gold is not None:
        line += f"; gold {summary['gold/best_of_n']:.4g} vs {summary['gold/single_sample']:.4g}"
    console.print(line)
    console.print(
        f"KL(best-of-n || policy) <= {summary['kl_upper_bound']:.4f} nats: {KL_BOUND_NOTE}"
    )
    console.print(f"saved {output_dir}")
    return summary
