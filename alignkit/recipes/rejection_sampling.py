"""Rejection-sampling fine-tuning (RAFT / ReST): sample n per prompt, keep the best, SFT, repeat.

Each round samples n completions per prompt from the *current* policy, scores them with the
reward, keeps the top k per prompt (RAFT, Dong et al., arXiv 2304.06767; Llama 2's rejection
sampling, arXiv 2307.09288) or every sample whose reward reaches a threshold that may rise
from round to round (ReST, Gulcehre et al., arXiv 2308.08998), and fine-tunes on the kept
samples with the SFT loss (NLL of the completion tokens). ALGORITHMS.md section 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from alignkit.config import check, doc
from alignkit.models import autocast
from alignkit.recipes.online import OnlineConfig
from alignkit.recipes.online_run import OnlineRun
from alignkit.recipes.policy_gradient import optimizer_update
from alignkit.recipes.sft import sft_loss
from alignkit.training.distributed import require_split
from alignkit.training.optim import check_finite


@dataclass
class Config(OnlineConfig):
    output_dir: str = doc("run directory", "runs/rsft")
    max_steps: int = doc("rounds: sample, select, fine-tune", 4)
    samples_per_prompt: int = doc("n: completions sampled per prompt each round", 8)
    selection: Literal["top", "threshold"] = doc(
        "top: the keep_top best of each prompt (RAFT); threshold: reward >= threshold (ReST)",
        "top",
    )
    keep_top: int = doc("samples kept per prompt with selection=top", 1)
    threshold: float = doc("reward a sample needs with selection=threshold (round 1)", 0.0)
    threshold_step: float = doc("added to the threshold each round (ReST's rising thresholds)", 0.0)
    sft_steps: int = doc("optimizer steps of SFT on each round's kept samples", 8)
    batch_size: int = doc("kept samples per SFT optimizer step", 8)
    lr: float = doc("peak learning rate (AdamW)", 1e-5)
    lr_schedule: Literal["linear", "cosine", "constant"] = doc(
        "decay after warm-up (stepped once per round)", "constant"
    )

    def validate(self) -> None:
        super().validate()
        check(
            1 <= self.keep_top <= self.samples_per_prompt,
            "keep_top",
            f"must be in [1, samples_per_prompt={self.samples_per_prompt}], got {self.keep_top}",
        )
        check(self.sft_steps >= 1, "sft_steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


def select_samples(
    rewards: torch.Tensor,  # (B, n) rewards of the n samples of each prompt
    selection: str,
    keep_top: int = 1,
    threshold: float = 0.0,
) -> torch.Tensor:  # (B, n) bool, True = kept
    """Which samples to fine-tune on: the ``keep_top`` best of each prompt (ties broken by
    sample order) or every sample with ``reward >= threshold``."""
    if selection == "top":
        order = torch.sort(rewards, dim=1, descending=True, stable=True).indices[:, :keep_top]
        kept = torch.zeros_like(rewards, dtype=torch.bool)
        return kept.scatter(1, order, True)
    if selection == "threshold":
        return rewards >= threshold
    raise ValueError(f"unknown selection {selection!r} (top or threshold)")


def round_threshold(threshold: float, threshold_step: float, round_number: int) -> float:
    """The threshold of round ``round_number`` (1-based): threshold + (round - 1) * step."""
    return threshold + (round_number - 1) * threshold_step


def sft_batches(
    num_rows: int, batch_size: int, steps: int, seed: int, round_number: int
) -> list[np.ndarray]:
    """Row indices of each SFT step: seeded shuffles of the kept rows, concatenated as needed."""
    rng = np.random.default_rng([seed, round_number])
    needed = batch_size * steps
    stream = np.concatenate([rng.permutation(num_rows) for _ in range(-(-needed // num_rows))])
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def autocast_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> tuple:
    """The SFT loss of ``batch`` (and its metrics) under bf16 autocast when asked."""
    with autocast(batch["input_ids"].device, enabled=bf16):
        return sft_loss(model, batch)


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    session = OnlineRun.start(
        config,
        lambda policy: policy,
        overwrite=overwrite,
        resume=resume,
        desc="rsft",
        states={},
        check_job=lambda job: require_split(job, config.batch_size, "batch_size"),
    )
    # sampling uses the plain policy (under fsdp a full copy of the sharded one,
    # refreshed every step); the update goes through session.forward
    policy, bf16 = session.rollout_policy, session.bf16
    params = [p for p in session.trainable.parameters() if p.requires_grad]
    n, job = config.samples_per_prompt, session.job

    for step in range(session.start_step + 1, config.max_steps + 1):
        # 1. sample n completions per prompt from the current policy  2. score them
        # (each rank its slice of the prompts; then every rank holds the whole batch)
        batch, first_row = session.local_prompts(step)
        with session.bf16_scope():
            experience = session.sample_and_score(policy, step, batch, first_row, n)
        experience, _ = session.gather_samples(experience)
        scores = experience.scores
        check_finite(float(scores.sum()), "reward", step, session.last_checkpoint)
        # 3. select: top k per prompt, or over this round's threshold
        threshold = round_threshold(config.threshold, config.threshold_step, step)
        kept = select_samples(scores.view(-1, n), config.selection, config.keep_top, threshold)
        kept_rows = kept.flatten().nonzero().squeeze(-1)
        metrics: dict[str, float] = {
            "score": float(scores.mean()),
            "score_kept": float(scores[kept_rows].mean()) if len(kept_rows) else float("nan"),
            "kept": float(len(kept_rows)),
            "response_length": float(experience.rollout.completion_lengths.float().mean()),
            "eos_fraction": float(experience.rollout.finished.float().mean()),
        }
        if config.selection == "threshold":
            metrics["threshold"] = threshold
        if experience.gold is not None:
            metrics["gold"] = float(experience.gold.mean())
            if len(kept_rows):
                metrics["gold_kept"] = float(experience.gold[kept_rows].mean())
        # 4. fine-tune on the kept samples with the SFT loss
        rollout = experience.rollout
        losses, grad_norms = [], []
        if len(kept_rows):
            order = sft_batches(
                len(kept_rows), config.batch_size, config.sft_steps, config.seed, step
            )
            for rows in order:
                whole = kept_rows[torch.as_tensor(rows)]
                index = job.local_rows(whole)  # this rank's chunk of the SFT batch
                sft_batch = {
                    "input_ids": rollout.input_ids[index],
                    "attention_mask": rollout.attention_mask[index],
                    "completion_mask": rollout.completion_mask[index],
                }
                with session.bf16_scope(update=True):
                    loss, _ = session.forward(autocast_loss, sft_batch, bf16)
                    loss_value = float(loss.detach())
                    if job.enabled:  # a token mean: this rank's share of the batch's tokens
                        mask = rollout.completion_mask
                        share = float(mask[index].sum() / mask[whole].sum().clamp(min=1))
                        loss = loss * share
                        loss_value = job.weighted_sum({"loss": loss_value}, share)["loss"]
                    check_finite(loss_value, "loss", step, session.last_checkpoint)
                    job.backward(loss)
                grad_norms.append(
                    optimizer_update(
                        params,
                        session.optimizer,
                        config.max_grad_norm,
                        step,
                        session.last_checkpoint,
                        job=job,
                    )
                )
                losses.append(loss_value)
        if losses:  # the schedule advances once per round that updated
            session.scheduler.step()
        # 5. log, evaluate, checkpoint
        metrics["sft_loss"] = sum(losses) / len(losses) if losses else float("nan")
        metrics["sft_loss_first"] = losses[0] if losses else float("nan")
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        metrics["lr"] = session.optimizer.param_groups[0]["lr"]
        session.end_of_step(step, metrics)
    return session.finish("max_steps")
