"""Critic-free policy gradients: RLOO, GRPO / Dr.GRPO, REINFORCE++, REINFORCE with a baseline.

- ``algo=rloo``: k samples per prompt, leave-one-out baseline, KL in the reward
  (Ahmadian et al. arXiv 2402.14740; Kool et al. 2019).
- ``algo=grpo``: group-normalised advantages, clipped ratio, k3 KL in the loss (Shao et al.
  arXiv 2402.03300); ``scale_by_std=false aggregation=constant`` is Dr.GRPO (Liu et al.
  arXiv 2503.20783).
- ``algo=reinforce_pp``: per-token KL in the reward, reward-to-go whitened over the global
  batch, PPO clip (Hu, arXiv 2501.03262); with k > 1 the group mean of the score is
  subtracted first (the paper's "w/ baseline").
- ``algo=reinforce``: REINFORCE (Williams 1992) with a moving-average baseline.

ALGORITHMS.md section 4. The loop matches :mod:`alignkit.recipes.ppo` without the critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignkit.config import check, doc
from alignkit.losses.policy import (
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    kl_penalized_scores,
    masked_mean,
    ppo_policy_loss,
    reinforce_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from alignkit.recipes.online_run import OnlineRun
from alignkit.recipes.policy_gradient import (
    PolicyGradientConfig,
    check_minibatch_split,
    collect_experience,
    first_ratio_deviation,
    forward_pass,
    gather_experience,
    minibatch_indices,
    optimizer_update,
    rollout_metrics,
    shape_scores,
    stop_reason,
)
from alignkit.training.optim import check_finite

Algo = Literal["rloo", "grpo", "reinforce_pp", "reinforce"]
GROUPED = ("rloo", "grpo")


@dataclass
class Config(PolicyGradientConfig):
    output_dir: str = doc("run directory", "runs/rl")
    algo: Algo = doc("rloo | grpo | reinforce_pp | reinforce", "rloo")
    samples_per_prompt: int = doc("completions per prompt (k of RLOO, G of GRPO)", 4)
    temperature: float = doc("sampling temperature (also used in the training forward)", 1.0)
    lr: float = doc("peak learning rate (AdamW)", 1e-5)
    kl_in: Literal["auto", "reward", "loss"] = doc(
        "where the KL penalty goes: reward (-beta KL folded into the reward) or loss "
        "(+beta k3 per token); auto = loss for grpo, reward otherwise",
        "auto",
    )
    scale_by_std: bool = doc("grpo: divide advantages by the group std (false for Dr.GRPO)", True)
    aggregation: Literal["sequence_mean", "constant"] = doc(
        "grpo token aggregation: sequence_mean (GRPO) or constant (Dr.GRPO)", "sequence_mean"
    )
    baseline_decay: float = doc("reinforce: decay of the moving-average reward baseline", 0.9)

    def validate(self) -> None:
        super().validate()
        if self.algo in GROUPED:
            check(self.samples_per_prompt >= 2, "samples_per_prompt", f"{self.algo} needs >= 2")
        if self.algo in ("rloo", "reinforce"):
            check(self.epochs == 1, "epochs", f"{self.algo} is clip-free: one pass per rollout")
        check(
            not (self.algo == "reinforce_pp" and self.kl_in == "loss"),
            "kl_in",
            "reinforce_pp puts the per-token KL in the reward",
        )
        check(0 <= self.baseline_decay < 1, "baseline_decay", "must be in [0, 1)")

    def kl_placement(self) -> str:
        if self.kl_in != "auto":
            return self.kl_in
        return "loss" if self.algo == "grpo" else "reward"


class MovingBaseline:
    """b <- decay b + (1 - decay) mean(R); starts at the first batch's mean."""

    def __init__(self, decay: float) -> None:
        self.decay, self.value, self.started = decay, 0.0, False

    def update(self, batch_mean: float) -> None:
        if not self.started:
            self.value, self.started = batch_mean, True
        else:
            self.value = self.decay * self.value + (1 - self.decay) * batch_mean

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "started": self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.started = float(state["value"]), bool(state["started"])


def sequence_k3(
    logps: torch.Tensor,  # (N, T) current policy, with gradient
    ref_logps: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
) -> torch.Tensor:  # ()
    """mean_i (1/|o_i|) sum_t k3_t: the KL-in-the-loss term of rloo / reinforce."""
    token_kl = kl_estimate(logps, ref_logps.detach(), "k3")
    return masked_mean(token_kl, mask, dim=1).mean()


def reuses_update_logps(config: Config, distributed: bool) -> bool:
    """The update's own forward gives the rollout-time log-probs: no pass before it.

    With one update over the whole batch straight after sampling (one epoch, one
    minibatch) the policy has not moved since it sampled, so its rollout-time
    log-probs are the update forward's, detached (the ratio is exactly 1, as TRL's
    GRPO takes them at ``num_iterations=1``). That holds when the rewards do not need
    them before the update (no KL in the reward) and, here, in one process (the
    metrics would need every rank's rows).
    """
    # (REINFORCE++ puts the KL in its token rewards whatever the placement)
    kl_in_reward = config.kl_placement() == "reward" or config.algo == "reinforce_pp"
    kl_in_reward = kl_in_reward and config.kl_coef != 0
    single_update = config.epochs == 1 and config.num_minibatches == 1
    return single_update and not kl_in_reward and not distributed


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    algo, k, kl_coef = config.algo, config.samples_per_prompt, config.kl_coef
    kl_in_loss = config.kl_placement() == "loss"
    baseline = MovingBaseline(config.baseline_decay)
    rows = config.prompts_per_step * k
    session = OnlineRun.start(
        config,
        lambda policy: policy,
        overwrite=overwrite,
        resume=resume,
        desc=algo,
        states={"baseline": baseline},
        check_job=lambda job: check_minibatch_split(job, rows, config.num_minibatches),
    )
    # sampling and rollout-time log-probs use the plain policy (under fsdp a full copy of
    # the sharded one, refreshed every step); the update goes through session.forward
    policy, inputs, bf16 = session.rollout_policy, session.inputs, session.bf16
    params = [p for p in session.trainable.parameters() if p.requires_grad]
    stop, job, pad_id = None, session.job, inputs.tokenizer.pad_token_id
    # one pass of the policy a step instead of two, when the update's can serve both
    reuse_logps = reuses_update_logps(config, job.enabled)

    def minibatch_loss(
        model: torch.nn.Module,
        rows: dict[str, torch.Tensor],
        old_logps: torch.Tensor | None,  # (n, T); None: this forward's own (reuse_logps)
        ref_logps: torch.Tensor | None,  # (n, T)
        advantages: torch.Tensor,  # (n,) or (n, T)
        mask: torch.Tensor,  # (n, T)
        prompt_length: int,
        temperature: float,
    ) -> tuple:
        """(loss, its metrics, new log-probs detached, entropies) of a minibatch's rows.

        The entropies only where ``old_logps`` is None (else None).
        """
        new = forward_pass(
            model, **rows, prompt_length=prompt_length, temperature=temperature, bf16=bf16,
            with_entropy=old_logps is None,
        )  # fmt: skip
        if old_logps is None:
            old_logps = new.logps.detach()
        if algo == "grpo":
            loss, loss_metrics = grpo_loss(
                new.logps,
                old_logps,
                ref_logps if kl_in_loss else None,
                advantages,
                mask,
                clip_eps=config.clip_eps,
                kl_coef=kl_coef if kl_in_loss else 0.0,
                aggregation=config.aggregation,
                max_completion_length=config.max_new_tokens,
            )
            loss_metrics["token_k3"] = loss_metrics.pop("kl")  # mean k3 in the loss
        elif algo == "reinforce_pp":
            loss, loss_metrics = ppo_policy_loss(
                new.logps, old_logps, advantages, mask, config.clip_eps
            )
        else:
            sequence_logps = (new.logps * mask).sum(1)  # (n,)
            loss, loss_metrics = reinforce_loss(sequence_logps, advantages)
            if kl_in_loss and kl_coef:
                loss = loss + kl_coef * sequence_k3(new.logps, ref_logps, mask)
        return loss, loss_metrics, new.logps.detach(), new.entropy

    for step in range(session.start_step + 1, config.max_steps + 1):
        lr = session.scheduler.get_last_lr()[0]
        # 1. rollout: k samples per prompt, then (no grad) old and reference log-probs;
        # each rank samples its slice of the prompts, then all ranks hold the whole batch
        batch, first_row = session.local_prompts(step)
        with session.bf16_scope():
            experience = collect_experience(
                policy,
                inputs.tokenizer,
                [inputs.train_prompts[i] for i in batch],
                [inputs.train_ids[i] for i in batch],
                config.sampling(step),
                k,
                inputs.reward_fn,
                config.reward,
                bf16,
                reference=session.reference,
                gold_fn=inputs.gold_fn,
                first_row=first_row,
                policy_pass=not reuse_logps,
            )
        experience = gather_experience(job, experience, pad_id)
        mask, old_logps, ref_logps = experience.mask, experience.old_logps, experience.ref_logps
        # 2. score
        scores = experience.scores
        check_finite(float(scores.sum()), "reward", step, session.last_checkpoint)
        scores = shape_scores(
            scores, experience.rollout.finished, config.missing_eos, config.missing_eos_penalty
        )
        # 3. KL: k1 of the rollout policy against the reference, in the reward or the loss
        # (reusing the update's log-probs, nothing before it weighs the KL: it is 0 here
        # and measured after the update)
        if reuse_logps:
            token_kl = torch.zeros_like(mask)
        else:
            token_kl = kl_estimate(old_logps, ref_logps, "k1")
        reward_kl_coef = 0.0 if kl_in_loss else kl_coef
        rewards = kl_penalized_scores(scores, token_kl, mask, reward_kl_coef)  # (N,)
        # 4. advantages
        if algo == "rloo":
            advantages = rloo_advantages(rewards.view(-1, k)).view(-1)  # (N,)
        elif algo == "grpo":
            advantages = grpo_advantages(rewards.view(-1, k), config.scale_by_std).view(-1)
        elif algo == "reinforce_pp":
            advantages, _ = reinforce_pp_advantages(
                scores, token_kl, mask, kl_coef, group_size=k if k > 1 else None
            )  # (N, T)
        else:
            batch_mean = float(rewards.mean())
            advantages = rewards - (baseline.value if baseline.started else batch_mean)
            baseline.update(batch_mean)
        # 5. update
        parts: list[dict[str, float]] = []
        first_ratio_dev, stopped_early = None, False
        for epoch in range(config.epochs):
            for minibatch in minibatch_indices(
                rows, config.num_minibatches, config.seed, step, epoch
            ):
                index = job.local_rows(minibatch)  # this rank's chunk of the minibatch
                mb_mask = mask[index]
                mb_old = old_logps[index] if old_logps is not None else None
                with session.bf16_scope(update=True):
                    loss, loss_metrics, new_logps, new_entropy = session.forward(
                        minibatch_loss,
                        experience.rows(index),
                        mb_old,
                        ref_logps[index] if ref_logps is not None else None,
                        advantages[index],
                        mb_mask,
                        experience.rollout.prompt_length,
                        experience.rollout.temperature,
                    )
                    if mb_old is None:  # reuse_logps: the rollout-time values are these
                        mb_old = new_logps
                        old_logps = torch.empty_like(new_logps).index_copy_(0, index, new_logps)
                        entropy = torch.empty_like(new_entropy).index_copy_(0, index, new_entropy)
                        experience.old_logps, experience.entropy = old_logps, entropy
                    log_ratio = new_logps - mb_old
                    part = {
                        "loss": float(loss.detach()),
                        "grad_norm": 0.0,  # set after the step
                        "approx_kl": float(
                            masked_mean(torch.expm1(log_ratio) - log_ratio, mb_mask)
                        ),
                        **{k_: float(v) for k_, v in loss_metrics.items()},
                    }
                    if job.enabled:
                        # this rank's share of the minibatch: of its tokens for token means, of
                        # its rows for sequence means (grpo's losses, REINFORCE, the k3 term)
                        token_share = float(mb_mask.sum() / mask[minibatch].sum().clamp(min=1))
                        row_share = len(index) / len(minibatch)
                        loss_share = token_share if algo == "reinforce_pp" else row_share
                        loss = loss * loss_share
                        shares = {key: token_share for key in part}
                        shares["loss"] = loss_share
                        part = job.weighted_sum(part, shares)
                        if "advantage_mean" in part:  # every rank holds all advantages
                            whole = advantages[minibatch].detach().float()
                            part["advantage_mean"] = float(whole.mean())
                            part["advantage_std"] = float(whole.std(correction=0))
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
                if first_ratio_dev is None:
                    first_ratio_dev = job.max(first_ratio_deviation(new_logps, mb_old, mb_mask))
                parts.append(part)
                target = config.target_approx_kl
                if target is not None and part["approx_kl"] > target:
                    stopped_early = True
                    break
            if stopped_early:
                break
        session.scheduler.step()

        # 6. log, stop criteria, checkpoint
        if reuse_logps:
            token_kl = kl_estimate(old_logps, ref_logps, "k1")
        sequence_kl = (token_kl * mask).sum(1)  # (N,)
        valid_advantages = advantages[mask.bool()] if advantages.dim() == 2 else advantages
        metrics = {
            **rollout_metrics(experience),
            "reward": float(rewards.mean()),
            "kl": float(sequence_kl.mean()),
            "kl_coef": kl_coef,
            "advantage_std": float(valid_advantages.std(correction=0)),
            **{k_: sum(p[k_] for p in parts) / len(parts) for k_ in parts[0]},
            "first_ratio_dev": first_ratio_dev,
            "updates": float(len(parts)),
            "lr": lr,
        }
        if algo in GROUPED:
            grouped = scores.view(-1, k)
            flat = (grouped == grouped[:, :1]).all(1).float().mean()
            metrics["zero_std_groups"] = float(flat)
        stop = stop_reason(metrics, config.stop_reward, config.kl_budget)
        if session.end_of_step(step, metrics, final=stop is not None):
            break
    return session.finish(stop or "max_steps")
