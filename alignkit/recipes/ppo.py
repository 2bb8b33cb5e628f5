"""PPO with a KL penalty to the reference and a learned critic (RLHF, arXiv 1909.08593, 2009.01325).

Ziegler et al. arXiv 1909.08593 (KL-penalised reward, adaptive KL controller), Stiennon et
al. arXiv 2009.01325, Ouyang et al. arXiv 2203.02155, and the implementation details of
Huang et al. arXiv 2403.17031 (missing-EOS penalty, critic from the reward model, the
sampling temperature in the training forward). PPO: Schulman et al. arXiv 1707.06347;
GAE: arXiv 1506.02438. ALGORITHMS.md section 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from alignkit.config import check, doc
from alignkit.logprobs import split_lm
from alignkit.losses.policy import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_estimate,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from alignkit.models import load_reward_backbone
from alignkit.recipes.online_run import OnlineRun
from alignkit.recipes.policy_gradient import (
    PolicyGradientConfig,
    RunningMoments,
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
from alignkit.training.distributed import Distributed
from alignkit.training.optim import check_finite


@dataclass
class Config(PolicyGradientConfig):
    output_dir: str = doc("run directory", "runs/ppo")
    critic: Literal["value_head", "separate"] = doc(
        "value_head: a linear head on the policy's backbone; separate: its own model, "
        "initialised from the reward model when reward is an RM directory",
        "value_head",
    )
    epochs: int = doc("passes over each rollout batch", 4)
    vf_coef: float = doc("weight c_v of the value loss", 0.1)
    value_clip_eps: float = doc("value clip around the rollout-time values", 0.2)
    gamma: float = doc("GAE discount", 1.0)
    lam: float = doc("GAE lambda", 0.95)
    whiten_advantages: bool = doc("normalise advantages to mean 0, std 1 over the batch", True)
    reward_norm: bool = doc("normalise scores by a running mean and std of all scores", False)
    kl_target: float | None = doc(
        "adaptive KL controller target (sequence KL); none = fixed kl_coef", None
    )
    kl_horizon: int = doc("adaptive KL controller horizon (episodes)", 10000)

    def validate(self) -> None:
        super().validate()
        check(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        check(self.value_clip_eps > 0, "value_clip_eps", "must be > 0")
        check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        if self.kl_target is not None:
            check(self.kl_target > 0, "kl_target", "must be > 0")
            check(self.kl_horizon > 0, "kl_horizon", "must be > 0")


# ---------------------------------------------------------------------------------------
# Critics: V(s_t) for the state that predicts token t
# ---------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """V = w . h + b on the policy's own last hidden states (one shared backbone)."""

    shares_backbone = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, L, H) -> (N, L)
        return self.linear(hidden).squeeze(-1)


class SeparateCritic(nn.Module):
    """A sequence-classification model read at every position: its backbone and scalar head."""

    shares_backbone = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (N, L, H)
        return self.model.score(hidden).squeeze(-1)  # (N, L)


def is_reward_model_dir(spec: str) -> bool:
    return (Path(spec).expanduser() / "config.json").is_file()


def build_critic(kind: str, policy: nn.Module, reward: str, model_name: str) -> nn.Module:
    """A value head on the policy, or a separate critic from the RM directory (when
    ``reward`` is one, as in arXiv 2403.17031) or from the policy's weights with a fresh head."""
    if kind == "value_head":
        backbone, _ = split_lm(policy)
        return ValueHead(backbone.config.hidden_size)
    model = load_reward_backbone(reward if is_reward_model_dir(reward) else model_name)
    if not hasattr(model, "score"):
        raise ValueError("critic=separate needs a decoder model with a 'score' head")
    return SeparateCritic(model)


def save_critic(critic: nn.Module, tokenizer: Any, output_dir: Path) -> None:
    """``value_head.safetensors`` or a ``critic/`` sequence-classification directory."""
    if isinstance(critic, ValueHead):
        state = {k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()}
        save_file(state, str(output_dir / "value_head.safetensors"))
    else:
        critic.model.save_pretrained(output_dir / "critic")
        tokenizer.save_pretrained(output_dir / "critic")


def explained_variance(
    job: Distributed, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> float:
    """1 - Var(R - V) / Var(R) over the valid tokens of every rank's rows (the moments
    summed over ranks, in float64)."""
    mask = mask.double()
    residual, returns = (returns - values).double(), returns.double()
    moments = {
        "n": float(mask.sum()),
        "r": float((residual * mask).sum()),
        "rr": float((residual**2 * mask).sum()),
        "g": float((returns * mask).sum()),
        "gg": float((returns**2 * mask).sum()),
    }
    total = job.weighted_sum(moments, 1.0)
    count = max(total["n"], 1.0)
    residual_var = total["rr"] / count - (total["r"] / count) ** 2
    returns_var = total["gg"] / count - (total["g"] / count) ** 2
    return 1.0 - residual_var / max(returns_var, 1e-8)


class PolicyAndCritic(nn.Module):
    """Holds both trained modules so one optimizer and one checkpoint cover them."""

    def __init__(self, policy: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    if config.kl_target is None:
        kl_controller = FixedKLController(config.kl_coef)
    else:
        kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    reward_stats = RunningMoments()
    rows = config.prompts_per_step * config.samples_per_prompt

    def build_trainable(policy: nn.Module) -> nn.Module:
        critic = build_critic(config.critic, policy, config.reward, config.model)
        return PolicyAndCritic(policy, critic)

    session = OnlineRun.start(
        config,
        build_trainable,
        overwrite=overwrite,
        resume=resume,
        desc="ppo",
        states={"kl_controller": kl_controller, "reward_stats": reward_stats},
        check_job=lambda job: check_minibatch_split(job, rows, config.num_minibatches),
    )
    # sampling and rollout-time values use the plain modules (under fsdp a full copy of
    # the sharded ones, refreshed every step); the update goes through session.forward
    policy, critic, inputs = session.rollout_policy, session.plain.critic, session.inputs
    params = [p for p in session.trainable.parameters() if p.requires_grad]
    bf16, job, pad_id = session.bf16, session.job, inputs.tokenizer.pad_token_id
    stop = None

    def minibatch_losses(
        trainable: PolicyAndCritic,
        rows: dict[str, torch.Tensor],
        old_logps: torch.Tensor,  # (n, T)
        old_values: torch.Tensor,  # (n, T)
        advantages: torch.Tensor,  # (n, T)
        returns: torch.Tensor,  # (n, T)
        mask: torch.Tensor,  # (n, T)
        prompt_length: int,
        temperature: float,
    ) -> tuple:
        """(policy loss, value loss, their metrics, new log-probs, new values) of a
        minibatch's rows, with gradients; the new tensors come back detached."""
        new = forward_pass(
            trainable.policy,
            **rows,
            prompt_length=prompt_length,
            temperature=temperature,
            bf16=bf16,
            critic=trainable.critic,
        )
        pg_loss, pg_metrics = ppo_policy_loss(
            new.logps, old_logps, advantages, mask, config.clip_eps
        )
        vf_loss, vf_metrics = ppo_value_loss(
            new.values, old_values, returns, mask, config.value_clip_eps
        )
        metrics = {**pg_metrics, **vf_metrics}
        return pg_loss, vf_loss, metrics, new.logps.detach(), new.values.detach()

    for step in range(session.start_step + 1, config.max_steps + 1):
        kl_coef, lr = kl_controller.value, session.scheduler.get_last_lr()[0]
        # 1. rollout: sample, then (no grad) the policy's log-probs, entropy and values;
        # each rank samples its slice of the prompts, then all ranks hold the whole batch
        batch, first_row = session.local_prompts(step)
        with session.bf16_scope():
            experience = collect_experience(
                policy,
                inputs.tokenizer,
                [inputs.train_prompts[i] for i in batch],
                [inputs.train_ids[i] for i in batch],
                config.sampling(step),
                config.samples_per_prompt,
                inputs.reward_fn,
                config.reward,
                bf16,
                reference=session.reference,
                gold_fn=inputs.gold_fn,
                critic=critic,
                first_row=first_row,
            )
        experience = gather_experience(job, experience, pad_id)
        mask, old_logps, old_values = experience.mask, experience.old_logps, experience.old_values
        # 2. score: missing-EOS penalty, optional running normalisation
        scores = experience.scores
        check_finite(float(scores.sum()), "reward", step, session.last_checkpoint)
        scores = shape_scores(
            scores, experience.rollout.finished, config.missing_eos, config.missing_eos_penalty
        )
        if config.reward_norm:
            reward_stats.update(scores)
            scores = (scores - reward_stats.mean) / max(reward_stats.std, 1e-8)
        # 3. KL: r_t = -beta k1_t, plus the score at the EOS token
        token_kl = kl_estimate(old_logps, experience.ref_logps, "k1")
        rewards, reward_metrics = ppo_token_rewards(scores, token_kl, mask, kl_coef)
        # 4. advantages: GAE over the valid tokens, whitened over the batch
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # 5. update: epochs over shuffled minibatches, clipped policy and value losses
        parts: list[dict[str, float]] = []
        first_ratio_dev = None
        stopped_early = False
        for epoch in range(config.epochs):
            for minibatch in minibatch_indices(
                rows, config.num_minibatches, config.seed, step, epoch
            ):
                index = job.local_rows(minibatch)  # this rank's chunk of the minibatch
                with session.bf16_scope(update=True):
                    pg_loss, vf_loss, loss_metrics, new_logps, new_values = session.forward(
                        minibatch_losses,
                        experience.rows(index),
                        old_logps[index],
                        old_values[index],
                        advantages[index],
                        returns[index],
                        mask[index],
                        experience.rollout.prompt_length,
                        experience.rollout.temperature,
                    )
                    loss = pg_loss + config.vf_coef * vf_loss
                    part = {
                        "pg_loss": float(pg_loss.detach()),
                        "value_loss": float(vf_loss.detach()),
                        "grad_norm": 0.0,  # set after the step
                        **{k: float(v) for k, v in loss_metrics.items()},
                    }
                    if job.enabled:
                        # both losses are token means: this rank's share of the minibatch's tokens
                        share = float(mask[index].sum() / mask[minibatch].sum().clamp(min=1))
                        loss = loss * share
                        part = job.weighted_sum(part, share)
                        part["explained_variance"] = explained_variance(
                            job, new_values, returns[index], mask[index]
                        )
                    total = part["pg_loss"] + config.vf_coef * part["value_loss"]
                    check_finite(total, "loss", step, session.last_checkpoint)
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
                    first_ratio_dev = job.max(
                        first_ratio_deviation(new_logps, old_logps[index], mask[index])
                    )
                parts.append(part)
                target = config.target_approx_kl
                if target is not None and part["approx_kl"] > target:
                    stopped_early = True
                    break
            if stopped_early:
                break
        session.scheduler.step()
        kl_controller.update(float(reward_metrics["kl"]), rows)

        # 6. log, stop criteria, checkpoint
        metrics = {
            **rollout_metrics(experience),
            "reward": float(scores.mean()),
            "kl": float(reward_metrics["kl"]),
            "non_score_reward": float(reward_metrics["non_score_reward"]),
            "kl_coef": kl_coef,
            **{k: sum(p[k] for p in parts) / len(parts) for k in parts[0]},
            "first_ratio_dev": first_ratio_dev,
            "updates": float(len(parts)),
            "lr": lr,
        }
        stop = stop_reason(metrics, config.stop_reward, config.kl_budget)
        if session.end_of_step(step, metrics, final=stop is not None):
            break
    return session.finish(
        stop or "max_steps",
        save_extra=lambda out: save_critic(critic, inputs.tokenizer, out),
    )
