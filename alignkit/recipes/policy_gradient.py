"""Loop pieces PPO and the REINFORCE family share: their common keys, one step's
experience, the training forward pass, minibatch order and the guarded optimizer step.

Every function takes plain arguments; each recipe keeps its own explicit loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from alignkit.config import check, doc
from alignkit.data.examples import Prompt
from alignkit.logprobs import split_lm, token_logps
from alignkit.losses.policy import penalize_missing_eos
from alignkit.models import autocast
from alignkit.recipes.online import OnlineConfig, ReferencePolicy, RewardFn, call_reward
from alignkit.rollout import Rollout, SamplingParams, generate
from alignkit.training.distributed import Distributed
from alignkit.training.optim import check_finite


@dataclass
class PolicyGradientConfig(OnlineConfig):
    """Keys PPO and the REINFORCE family share, on top of :class:`OnlineConfig`."""

    epochs: int = doc("passes over each rollout batch", 1)
    num_minibatches: int = doc("minibatches (optimizer steps) per pass", 1)
    clip_eps: float = doc("ratio clip epsilon of the clipped objectives", 0.2)
    target_approx_kl: float | None = doc(
        "stop a step's passes once approx KL(pi_old || pi) exceeds this; none = off", None
    )
    missing_eos: Literal["none", "replace", "subtract"] = doc(
        "score of completions cut at max_new_tokens: none | replace by | subtract the penalty",
        "none",
    )
    missing_eos_penalty: float = doc("the missing-EOS penalty", -1.0)
    stop_reward: float | None = doc("stop when a step's mean score reaches this; none = off", None)
    kl_budget: float | None = doc(
        "stop when a step's mean sequence KL exceeds this; none = off", None
    )

    def validate(self) -> None:
        super().validate()
        check(self.epochs >= 1, "epochs", "must be >= 1")
        rows = self.prompts_per_step * self.samples_per_prompt
        check(
            1 <= self.num_minibatches <= rows,
            "num_minibatches",
            f"must be in [1, prompts_per_step x samples_per_prompt = {rows}]",
        )
        check(self.clip_eps > 0, "clip_eps", "must be > 0")
        if self.target_approx_kl is not None:
            check(self.target_approx_kl > 0, "target_approx_kl", "must be > 0")


def shape_scores(
    scores: torch.Tensor, finished: torch.Tensor, missing_eos: str, penalty: float
) -> torch.Tensor:
    """Scores with the missing-EOS penalty applied (``missing_eos`` none | replace | subtract)."""
    if missing_eos == "none":
        return scores
    return penalize_missing_eos(scores, finished, penalty, missing_eos)


def stop_reason(
    metrics: dict[str, float], stop_reward: float | None, kl_budget: float | None
) -> str | None:
    """``stop_reward`` when the step's mean score reached it, ``kl_budget`` when the mean
    sequence KL passed it, else None."""
    if kl_budget is not None and metrics["kl"] > kl_budget:
        return "kl_budget"
    if stop_reward is not None and metrics["score"] >= stop_reward:
        return "stop_reward"
    return None


# ---------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_hidden(policy: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the policy backbone's last hidden states (B, T, H) during the block, so a
    value head can share the forward pass that computes the log-probs."""
    backbone, _ = split_lm(policy)
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state)

    handle = backbone.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@dataclass
class ForwardOut:
    """Per-token results over the completion columns (P onwards), each (N, T)."""

    logps: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None


def forward_pass(
    policy: nn.Module,
    input_ids: torch.Tensor,  # (N, P+T)
    attention_mask: torch.Tensor,  # (N, P+T)
    completion_mask: torch.Tensor,  # (N, P+T)
    prompt_length: int,
    temperature: float,
    bf16: bool,
    critic: nn.Module | None = None,
    with_entropy: bool = False,
) -> ForwardOut:
    """Log-probs at the sampling temperature, optional entropies, and the critic's values.

    ``critic`` has ``shares_backbone``: a value head reads the policy's hidden states from
    this same forward pass; a separate critic runs its own. Value t is the critic's
    output at the state that predicts token t (aligned with the log-probs).
    """
    device = input_ids.device
    values = None
    with autocast(device, enabled=bf16):
        shared = critic is not None and critic.shares_backbone
        with capture_hidden(policy) if shared else contextlib.nullcontext([]) as captured:
            result = token_logps(
                policy,
                input_ids,
                attention_mask,
                completion_mask,
                temperature=temperature,
                with_entropy=with_entropy,
            )
        if critic is not None:
            outputs = critic(captured[-1]) if shared else critic(input_ids, attention_mask)
            values = nn.functional.pad(outputs[:, :-1].float(), (1, 0))  # (N, P+T)
    columns = slice(prompt_length, None)
    entropy = result.entropy[:, columns] if result.entropy is not None else None
    return ForwardOut(
        logps=result.logps[:, columns],
        entropy=entropy,
        values=values[:, columns] if values is not None else None,
    )


# ---------------------------------------------------------------------------------------
# One step's experience
# ---------------------------------------------------------------------------------------


@dataclass
class Experience:
    """A rollout with everything computed from it without gradients. Token tensors are
    over the completion columns, (N, T); N = prompts x samples, samples contiguous."""

    rollout: Rollout
    prompts: list[Prompt]  # N, the prompt of each row
    scores: torch.Tensor  # (N,) reward as returned
    gold: torch.Tensor | None  # (N,) the task's gold score
    mask: torch.Tensor  # (N, T) float, 1 on completion tokens (EOS included)
    # (N, T) policy at rollout time, sampling temperature; None until the update's own
    # forward gives them (collect_experience with policy_pass=False), as entropy
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None  # (N, T) reference, sampling temperature
    entropy: torch.Tensor | None  # (N, T)
    old_values: torch.Tensor | None  # (N, T) critic at rollout time

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs of the rows ``index`` (a minibatch)."""
        r = self.rollout
        return {
            "input_ids": r.input_ids[index],
            "attention_mask": r.attention_mask[index],
            "completion_mask": r.completion_mask[index],
        }


@torch.no_grad()
def collect_experience(
    policy: nn.Module,
    tokenizer: Any,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    params: SamplingParams,
    num_samples: int,
    reward_fn: RewardFn,
    reward_name: str,
    bf16: bool,
    reference: ReferencePolicy | None = None,
    gold_fn: RewardFn | None = None,
    critic: nn.Module | None = None,
    first_row: int | None = None,
    policy_pass: bool = True,
) -> Experience:
    """Sample, score with the reward (and gold), and run the policy, critic and reference.

    ``first_row``: these prompts' rows start at this global row (every row then samples
    from its own seed, see :func:`alignkit.rollout.generate`). ``policy_pass=False``:
    no pass of the policy (and critic) over the samples; ``old_logps``, ``entropy`` and
    ``old_values`` stay None for the caller's update to fill in."""
    rollout = generate(
        policy, tokenizer, prompt_ids, params, num_samples=num_samples, bf16=bf16,
        first_row=first_row,
    )  # fmt: skip
    # (the reward gets strings; its scores come back on the rollout's device)
    row_prompts = [prompts[int(i)] for i in rollout.prompt_index]
    device = rollout.input_ids.device
    scores = call_reward(reward_fn, row_prompts, rollout.completions, reward_name, device)
    gold = None
    if gold_fn is not None:
        gold = call_reward(gold_fn, row_prompts, rollout.completions, "gold", device)
    old_logps = entropy = old_values = None
    if policy_pass:
        old = forward_pass(
            policy,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.completion_mask,
            rollout.prompt_length,
            rollout.temperature,
            bf16,
            critic=critic,
            with_entropy=True,
        )
        old_logps, entropy, old_values = old.logps, old.entropy, old.values
    ref_logps = None
    if reference is not None:
        ref_logps = reference.logps(rollout, bf16)[:, rollout.prompt_length :]
    return Experience(
        rollout=rollout,
        prompts=row_prompts,
        scores=scores,
        gold=gold,
        mask=rollout.completion_mask[:, rollout.prompt_length :].float(),
        old_logps=old_logps,
        ref_logps=ref_logps,
        entropy=entropy,
        old_values=old_values,
    )


def _pad_columns(tensor: torch.Tensor, left: int, right: int, value: float = 0) -> torch.Tensor:
    return nn.functional.pad(tensor, (left, right), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of consecutive prompt slices as one: rows re-padded to the widest prompt
    (on the left) and the longest completion (on the right), prompt indices shifted."""
    width = max(r.prompt_length for r in parts)
    steps = max(r.input_ids.shape[1] - r.prompt_length for r in parts)

    def full(r: Rollout, tensor: torch.Tensor, value: float = 0) -> torch.Tensor:
        right = steps - (r.input_ids.shape[1] - r.prompt_length)
        return _pad_columns(tensor, width - r.prompt_length, right, value)

    offsets = [0]
    for r in parts[:-1]:
        offsets.append(offsets[-1] + int(r.prompt_index.max()) + 1)
    return Rollout(
        input_ids=torch.cat([full(r, r.input_ids, pad_id) for r in parts]),
        attention_mask=torch.cat([full(r, r.attention_mask) for r in parts]),
        completion_mask=torch.cat([full(r, r.completion_mask) for r in parts]),
        sampling_logps=torch.cat([full(r, r.sampling_logps) for r in parts]),
        finished=torch.cat([r.finished for r in parts]),
        prompt_index=torch.cat([r.prompt_index + o for r, o in zip(parts, offsets, strict=True)]),
        completions=[c for r in parts for c in r.completions],
        completion_lengths=torch.cat([r.completion_lengths for r in parts]),
        prompt_length=width,
        temperature=parts[0].temperature,
    )


def gather_experience(job: Distributed, local: Experience, pad_id: int) -> Experience:
    """Every rank's experience, concatenated in rank order: the step's global batch.

    Ranks pad their rollouts to their own longest prompt and completion; the rows are
    re-padded to the global widths (prompts on the left, completions on the right), so
    the result is the batch one process would have sampled.
    """
    if not job.enabled:
        return local
    parts: list[Experience] = job.gather(local)
    rollout = concat_rollouts([p.rollout for p in parts], pad_id)
    steps = rollout.input_ids.shape[1] - rollout.prompt_length

    def tokens(name: str) -> torch.Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        return torch.cat(
            [_pad_columns(getattr(p, name), 0, steps - p.mask.shape[1]) for p in parts]
        )

    gold = None if parts[0].gold is None else torch.cat([p.gold for p in parts])
    return Experience(
        rollout=rollout,
        prompts=[x for p in parts for x in p.prompts],
        scores=torch.cat([p.scores for p in parts]),
        gold=gold,
        mask=tokens("mask"),
        old_logps=tokens("old_logps"),
        ref_logps=tokens("ref_logps"),
        entropy=tokens("entropy"),
        old_values=tokens("old_values"),
    )


def check_minibatch_split(job: Distributed, rows: int, num_minibatches: int) -> None:
    """Under several ranks every minibatch must split into equal per-rank chunks."""
    from alignkit.errors import InputError

    if job.enabled and (rows % num_minibatches or (rows // num_minibatches) % job.world_size):
        raise InputError(
            f"{rows} rows per step in {num_minibatches} minibatches do not split evenly "
            f"over {job.world_size} processes",
            path="config",
            field="num_minibatches",
        )


def rollout_metrics(experience: Experience) -> dict[str, float]:
    """Score, gold, response length, EOS rate and entropy of a step's samples."""
    mask = experience.mask
    metrics = {
        "score": float(experience.scores.mean()),
        "response_length": float(mask.sum(1).mean()),
        "eos_fraction": float(experience.rollout.finished.float().mean()),
        "entropy": float((experience.entropy * mask).sum() / mask.sum().clamp(min=1)),
    }
    if experience.gold is not None:
        metrics["gold"] = float(experience.gold.mean())
    return metrics


# ---------------------------------------------------------------------------------------
# Update pieces
# ---------------------------------------------------------------------------------------


def minibatch_indices(
    num_rows: int, num_minibatches: int, seed: int, step: int, epoch: int
) -> list[torch.Tensor]:
    """A seeded shuffle of the rows split into ``num_minibatches`` parts (from (seed, step,
    epoch) only, so resume is exact)."""
    order = np.random.default_rng([seed, step, epoch]).permutation(num_rows)
    return [torch.as_tensor(part) for part in np.array_split(order, num_minibatches) if len(part)]


def optimizer_update(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    step: int,
    last_checkpoint: str | None,
    job: Distributed | None = None,
) -> float:
    """Clip, refuse NaN/inf gradients, step and zero the gradients; returns the grad norm.

    The learning-rate schedule advances once per rollout step, not per minibatch, so the
    recipe steps the scheduler itself. With ``job`` on several ranks the gradients are
    first summed over ranks (each rank's loss carries its share of the global mean);
    under FSDP2 the backward pass has reduced them into the shards already.
    """
    if job is not None:
        job.sum_gradients(params)
    with_grad = [p for p in params if p.grad is not None]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = 0.0
    if with_grad:
        total = torch.nn.utils.clip_grad_norm_(with_grad, limit)
        # FSDP2's gradients are sharded DTensors: their norm is one too
        grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    check_finite(grad_norm, "gradient norm", step, last_checkpoint)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def first_ratio_deviation(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor
) -> float:
    """max |pi/pi_old - 1| over valid tokens: 0 up to numerics at the first minibatch."""
    ratio = torch.exp(logps.detach().float() - old_logps.float())
    return float(((ratio - 1).abs() * mask).max()) if mask.any() else 0.0


class RunningMoments:
    """Running mean and standard deviation of every value seen (Chan et al. merge)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double()
        batch_count = values.numel()
        batch_mean = float(values.mean())
        batch_var = float(values.var(correction=0))
        total = self.count + batch_count
        delta = batch_mean - self.mean
        merged = self.var * self.count + batch_var * batch_count
        merged += delta**2 * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var = merged / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = int(state["count"]), state["mean"], state["var"]
