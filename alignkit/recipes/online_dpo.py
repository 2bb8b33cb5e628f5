"""Online / iterative DPO: sample n per prompt, label best vs worst with a reward, run DPO, repeat.

Each round samples n completions per prompt from the *current* policy, labels them with a
reward source (an RM, a Python function, a task's judge; an AI annotator in OAIF), pairs the
best with the worst (ties dropped) and takes ``dpo_steps`` optimizer steps of a pairwise loss
from ``PAIRWISE_LOSSES`` on those fresh on-policy pairs.

- OAIF, Guo et al., arXiv 2402.04792: on-policy pairs labelled online, any offline loss;
- iterative DPO, Xiong et al., arXiv 2312.11456, and "RLHF Workflow", Dong et al.,
  arXiv 2405.07863: best-vs-worst of n by a reward model, DPO, repeat.

The reference stays the initial policy (``reference_update=fixed``) or is the policy as it
was at the start of each round (``refresh``). ALGORITHMS.md section 6.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from alignkit.config import check, doc
from alignkit.losses.preference import PAIRWISE_LOSS_SPECS
from alignkit.models import autocast
from alignkit.recipes.best_of_n import sequence_logps
from alignkit.recipes.dpo import make_pairwise_loss
from alignkit.recipes.online import OnlineConfig
from alignkit.recipes.online_run import OnlineRun
from alignkit.recipes.policy_gradient import optimizer_update
from alignkit.training.distributed import require_split
from alignkit.training.optim import check_finite

PairwiseLossName = Literal["dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo", "orpo", "rpo"]


@dataclass
class Config(OnlineConfig):
    output_dir: str = doc("run directory", "runs/online_dpo")
    max_steps: int = doc("rounds: sample, label, DPO", 8)
    samples_per_prompt: int = doc("n: completions sampled per prompt; best vs worst is a pair", 4)
    loss: PairwiseLossName = doc("dpo | cdpo | rdpo | ipo | hinge | simpo | orpo | rpo", "dpo")
    beta: float = doc("KL strength beta (tau for IPO, lambda for ORPO)", 0.1)
    label_smoothing: float = doc("flip probability eps for cdpo / rdpo", 0.1)
    gamma_beta_ratio: float = doc("SimPO margin gamma / beta", 0.5)
    nll_coef: float = doc("RPO weight alpha on the chosen NLL", 1.0)
    reference_update: Literal["fixed", "refresh"] = doc(
        "fixed: the initial policy; refresh: the policy at the start of each round", "fixed"
    )
    dpo_steps: int = doc("optimizer steps on each round's pairs", 4)
    batch_size: int = doc("pairs per optimizer step", 8)
    lr: float = doc("peak learning rate (AdamW)", 5e-6)
    lr_schedule: Literal["linear", "cosine", "constant"] = doc(
        "decay after warm-up (stepped once per round)", "constant"
    )

    def validate(self) -> None:
        super().validate()
        check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 to form pairs")
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(self.dpo_steps >= 1, "dpo_steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


def best_worst_pairs(
    rewards: torch.Tensor,  # (B, n) rewards of the n samples of each prompt
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt (P,), chosen column (P,), rejected column (P,)) for every prompt whose best
    and worst samples differ in reward; prompts whose samples all tie give no pair.
    Ties for best or worst go to the first sample."""
    chosen = rewards.argmax(dim=1)
    rejected = rewards.argmin(dim=1)
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    keep = (spread > 0).nonzero().squeeze(-1)
    return keep, chosen[keep], rejected[keep]


def pair_batches(num_pairs: int, batch_size: int, steps: int, seed: int, round_number: int) -> list:
    """Pair indices of each optimizer step: seeded shuffles, concatenated as needed."""
    rng = np.random.default_rng([seed, round_number])
    needed = batch_size * steps
    stream = np.concatenate([rng.permutation(num_pairs) for _ in range(-(-needed // num_pairs))])
    return [torch.as_tensor(stream[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    session = OnlineRun.start(
        config,
        lambda policy: policy,
        overwrite=overwrite,
        resume=resume,
        desc=f"online-{config.loss}",
        states={},
        check_job=lambda job: require_split(job, config.batch_size, "batch_size"),
    )
    # sampling and the refreshed reference use the plain policy (under fsdp a full copy
    # of the sharded one, refreshed every step); the update goes through session.forward
    policy, bf16 = session.rollout_policy, session.bf16
    params = [p for p in session.trainable.parameters() if p.requires_grad]
    n, job = config.samples_per_prompt, session.job
    spec = PAIRWISE_LOSS_SPECS[config.loss]
    pairwise_loss = make_pairwise_loss(
        config.loss,
        {
            "beta": config.beta,
            "label_smoothing": config.label_smoothing,
            "gamma_beta_ratio": config.gamma_beta_ratio,
            "nll_coef": config.nll_coef,
        },
    )

    def compute_loss(model: torch.nn.Module, pair_batch: dict[str, torch.Tensor]) -> tuple:
        with autocast(pair_batch["input_ids"].device, enabled=bf16):
            return pairwise_loss(model, pair_batch)

    for step in range(session.start_step + 1, config.max_steps + 1):
        round_started = time.time()
        # 1. sample n completions per prompt from the current policy  2. label them
        # (each rank its slice of the prompts; then every rank holds the whole batch)
        batch, first_row = session.local_prompts(step)
        with session.bf16_scope():
            samples = session.sample_and_score(policy, step, batch, first_row, n)
            # reference sums of every sample, each rank for its own rows (used once pairs exist)
            per_row = {}
            if spec.needs_reference:
                local = samples.rollout
                if config.reference_update == "refresh":
                    per_row["ref_sums"] = sequence_logps(policy, local, bf16)
                else:
                    ref_logps = session.reference.logps(local, bf16, 1.0)
                    per_row["ref_sums"] = (ref_logps * local.completion_mask).sum(-1)
        samples, per_row = session.gather_samples(samples, per_row)
        scores = samples.scores
        check_finite(float(scores.sum()), "reward", step, session.last_checkpoint)
        # 3. pairs: best vs worst of each prompt, ties dropped
        prompt_rows, chosen_cols, rejected_cols = best_worst_pairs(scores.view(-1, n))
        chosen_rows, rejected_rows = prompt_rows * n + chosen_cols, prompt_rows * n + rejected_cols
        metrics: dict[str, float] = {
            "score": float(scores.mean()),
            "pairs": float(len(prompt_rows)),
            "ties_dropped": float(config.prompts_per_step - len(prompt_rows)),
            "response_length": float(samples.rollout.completion_lengths.float().mean()),
            "eos_fraction": float(samples.rollout.finished.float().mean()),
        }
        if samples.gold is not None:
            metrics["gold"] = float(samples.gold.mean())
        parts: list[dict[str, float]] = []
        if len(prompt_rows):
            metrics["score_chosen"] = float(scores[chosen_rows].mean())
            metrics["score_rejected"] = float(scores[rejected_rows].mean())
            # 4. reference log-probs of the pairs (computed with the samples, once per round)
            rollout = samples.rollout
            ref_sums = per_row.get("ref_sums")
            # 5. update: dpo_steps optimizer steps of the pairwise loss
            order = pair_batches(
                len(prompt_rows), config.batch_size, config.dpo_steps, config.seed, step
            )
            for whole in order:
                pair_index = job.local_rows(whole)  # this rank's chunk of the pairs
                rows = torch.cat([chosen_rows[pair_index], rejected_rows[pair_index]])
                pair_batch = {
                    "input_ids": rollout.input_ids[rows],
                    "attention_mask": rollout.attention_mask[rows],
                    "completion_mask": rollout.completion_mask[rows],
                }
                if ref_sums is not None:
                    pair_batch["ref_logps"] = torch.stack(
                        [ref_sums[chosen_rows[pair_index]], ref_sums[rejected_rows[pair_index]]], -1
                    )
                with session.bf16_scope(update=True):
                    loss, loss_metrics = session.forward(compute_loss, pair_batch)
                    part = {
                        "loss": float(loss.detach()),
                        "grad_norm": 0.0,  # set after the step
                        **{k: float(v) for k, v in loss_metrics.items()},
                    }
                    if job.enabled:  # means over pairs: this rank's share of them
                        share = len(pair_index) / len(whole)
                        loss = loss * share
                        shares = {key: share for key in part}
                        shares["tokens"] = 1.0  # a count, summed
                        part = job.weighted_sum(part, shares)
                    check_finite(part["loss"], "loss", step, session.last_checkpoint)
                    job.backward(loss)
                part["grad_norm"] = optimizer_update(
                    params,
                    session.optimizer,
                    config.max_grad_norm,
                    step,
                    session.last_checkpoint,
                    job=job,
                )
                parts.append(part)
        if parts:  # the schedule advances once per round that updated
            session.scheduler.step()
        # 6. log, evaluate, checkpoint
        if parts:
            metrics.update({k: sum(p[k] for p in parts) / len(parts) for k in parts[0]})
            metrics["loss_first"] = parts[0]["loss"]
        metrics["lr"] = session.optimizer.param_groups[0]["lr"]
        metrics["round_seconds"] = time.time() - round_started
        session.end_of_step(step, metrics)
    return session.finish("max_steps")
