"""Policy-gradient pieces for online RLHF: KL estimators, per-token rewards, GAE, whitening,
the PPO policy and value losses, RLOO / GRPO / REINFORCE++ advantages, the GRPO loss,
REINFORCE with a baseline, and KL-coefficient controllers.

Pure functions of tensors (ALGORITHMS.md sections 3-4). ``mask`` is 1 on completion tokens
(EOS included) and 0 on padding; token tensors have shape ``(N, T)`` where N counts
sequences (prompts x samples per prompt, samples of one prompt contiguous). Everything is
computed in fp32. Behaviour (``old_logps``), reference (``ref_logps``) log-probs, values
from the rollout, and advantages are treated as constants: they are detached here.
"""

from __future__ import annotations

from typing import Literal

import torch

Metrics = dict[str, torch.Tensor]
KLEstimator = Literal["k1", "k2", "k3"]


# ---------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------


def masked_mean(
    values: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
    dim: int | None = None,
) -> torch.Tensor:
    """sum(m * x) / sum(m), over all elements or along ``dim`` (0 where the mask is empty)."""
    values, mask = values.float(), mask.float()
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(
    values: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise to mean 0, std 1 over the valid tokens of the whole batch.

    x' = (x - mean_m(x)) / sqrt(var_m(x) + eps)   (+ mean_m(x) back if not ``shift_mean``)

    The variance is the population variance over valid tokens (lm-human-preferences
    ``whiten``; Ziegler et al., arXiv 1909.08593). Padding positions are returned as 0.
    """
    values, mask = values.float(), mask.float()
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------
# KL and per-token rewards
# ---------------------------------------------------------------------------------------


def kl_estimate(
    logps: torch.Tensor,  # (N, T) log pi(y_t), the sampling policy
    ref_logps: torch.Tensor,  # (N, T) log pi_ref(y_t)
    estimator: KLEstimator = "k1",
    log_ratio_clamp: float = 10.0,
) -> torch.Tensor:  # (N, T)
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With log r = log pi_ref - log pi, clamped to [-c, c]:
      k1 = -log r              unbiased, high variance, can be negative
      k2 = (log r)^2 / 2       biased, low variance
      k3 = (r - 1) - log r     unbiased, >= 0, low variance

    Schulman, "Approximating KL divergence" (2020, blog, no arXiv id). These estimate the
    value of the KL; differentiating them does not in general give an unbiased KL gradient.
    Multiply by the mask before summing.
    """
    log_ratio = (ref_logps.float() - logps.float()).clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:  # (N,)
    """Index of the last valid token of each row (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def penalize_missing_eos(
    scores: torch.Tensor,  # (N,)
    contains_eos: torch.Tensor,  # (N,) bool
    penalty: float,
    mode: Literal["replace", "subtract"] = "replace",
) -> torch.Tensor:  # (N,)
    """Score of completions that stopped without EOS: set to ``penalty`` or reduce by it.

    "replace": s = penalty (OpenAI lm-human-preferences, N+ details arXiv 2403.17031,
    penalty -1). "subtract": s = s - penalty (TRL ``missing_eos_penalty``).
    """
    scores = scores.float()
    contains_eos = contains_eos.bool()
    if mode == "replace":
        penalized = torch.full_like(scores, penalty)
    elif mode == "subtract":
        penalized = scores - penalty
    else:
        raise ValueError(f"unknown missing-EOS mode {mode!r}; expected replace or subtract")
    return torch.where(contains_eos, scores, penalized)


def ppo_token_rewards(
    scores: torch.Tensor,  # (N,) reward-model score per completion
    token_kl: torch.Tensor,  # (N, T) per-token KL estimate, e.g. kl_estimate(old, ref, "k1")
    mask: torch.Tensor,  # (N, T)
    kl_coef: float,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token rewards of KL-regularised RLHF.

    r_t = -kl_coef * KL_t,  plus s at the last valid (EOS) token; 0 on padding.

    Ziegler et al., arXiv 1909.08593; Stiennon et al., arXiv 2009.01325. Apply
    :func:`penalize_missing_eos` to ``scores`` first. Metrics: ``kl`` is the batch mean
    of the sequence-summed KL (the input of the adaptive KL controller).
    """
    mask = mask.float()
    token_kl = token_kl.detach().float() * mask
    scores = scores.detach().float()
    rewards = -kl_coef * token_kl
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores * (mask.sum(1) > 0)
    sequence_kl = token_kl.sum(1)
    metrics = {
        "kl": sequence_kl.mean(),
        "non_score_reward": (-kl_coef * sequence_kl).mean(),
        "score": scores.mean(),
    }
    return rewards, metrics


def kl_penalized_scores(
    scores: torch.Tensor,  # (N,)
    token_kl: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
    kl_coef: float,
) -> torch.Tensor:  # (N,)
    """Sequence reward with the KL folded in: R = s - kl_coef * sum_t m_t KL_t.

    The reward of REINFORCE / RLOO (Ahmadian et al., arXiv 2402.14740).
    """
    return scores.detach().float() - kl_coef * (token_kl.detach().float() * mask.float()).sum(1)


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,  # (N, T)
    values: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:  # advantages (N, T), returns (N, T)
    """Generalised advantage estimation over the valid tokens of each row.

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   V_T = 0
    returns R_t = A_t + V_t (the value target)

    Schulman et al., arXiv 1506.02438, Eq. 16. A reverse loop over t; masked positions are
    skipped (t+1 means the next valid token; after the last one V = 0, A = 0), and get
    A = R = 0. Inputs are detached.
    """
    rewards, values, mask = rewards.detach().float(), values.detach().float(), mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def reward_to_go(
    rewards: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
) -> torch.Tensor:  # (N, T)
    """Undiscounted return G_t = sum_{u >= t} m_u r_u, zero on padding."""
    masked = rewards.detach().float() * mask.float()
    return masked.flip(1).cumsum(1).flip(1) * mask.float()


def rloo_advantages(
    rewards: torch.Tensor,  # (B, k) k samples per prompt
) -> torch.Tensor:  # (B, k)
    """REINFORCE leave-one-out advantages.

    A_i = R_i - 1/(k-1) sum_{j != i} R_j = k/(k-1) (R_i - mean_j R_j)

    Ahmadian et al., arXiv 2402.14740, Eq. 7; Kool et al. 2019. Needs k >= 2.
    """
    rewards = rewards.detach().float()
    num_samples = rewards.shape[1]
    if num_samples < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    leave_one_out_mean = (rewards.sum(1, keepdim=True) - rewards) / (num_samples - 1)
    return rewards - leave_one_out_mean


def grpo_advantages(
    scores: torch.Tensor,  # (B, G) G samples per prompt
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:  # (B, G)
    """Group-normalised advantages.

    GRPO:     A_i = (s_i - mean(s)) / (std(s) + eps)   (std with Bessel's correction, as TRL)
    Dr.GRPO:  A_i =  s_i - mean(s)                    (``scale_by_std=False``)

    Shao et al., arXiv 2402.03300 (section 4.1.2); Liu et al., arXiv 2503.20783. A group
    whose scores are all equal gets A = 0. Needs G >= 2.
    """
    scores = scores.detach().float()
    if scores.shape[1] < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    centered = scores - scores.mean(1, keepdim=True)
    if not scale_by_std:
        return centered
    return centered / (scores.std(1, keepdim=True) + eps)


def reinforce_pp_advantages(
    scores: torch.Tensor,  # (N,) reward-model score per completion
    token_kl: torch.Tensor,  # (N, T) k1 KL of pi_old vs pi_ref
    mask: torch.Tensor,  # (N, T)
    kl_coef: float,
    group_size: int | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE++ advantages: reward-to-go of per-token KL-penalised rewards, whitened
    over all valid tokens of the batch.

    r_t = -kl_coef KL_t (+ s at EOS),  A_t = sum_{u >= t} r_u,  A <- (A - mean) / std

    Hu, arXiv 2501.03262. With ``group_size`` (the "w/ baseline" variant, samples of one
    prompt contiguous) s is first reduced by its group mean. Use with the PPO clipped
    loss, :func:`ppo_policy_loss`.
    """
    scores = scores.detach().float()
    if group_size is not None:
        grouped = scores.view(-1, group_size)
        scores = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    rewards, metrics = ppo_token_rewards(scores, token_kl, mask, kl_coef)
    returns = reward_to_go(rewards, mask)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps), metrics


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: torch.Tensor,  # (N, T) current policy
    old_logps: torch.Tensor,  # (N, T) behaviour policy from the rollout
    advantages: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T)
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, a masked mean over all valid tokens.

    ratio_t = exp(lp_t - lp_old,t)
    L = mean_m[ max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)) ]

    Schulman et al., arXiv 1707.06347, Eq. 7. Metrics: ``clip_fraction`` (share of tokens
    where the clipped term is the active one), ``approx_kl`` (masked mean of the k3
    estimate of KL(pi_old || pi)), ``ratio_mean``.
    """
    logps = logps.float()
    advantages = advantages.detach().float()
    log_ratio = logps - old_logps.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,  # (N, T) current critic
    old_values: torch.Tensor,  # (N, T) critic at rollout time
    returns: torch.Tensor,  # (N, T) GAE returns
    mask: torch.Tensor,  # (N, T)
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss.

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    L = 0.5 mean_m[ max((V - R)^2, (V_clip - R)^2) ]

    As in OpenAI lm-human-preferences and the N+ details (arXiv 2403.17031). Metrics:
    ``value_clip_fraction``, ``explained_variance`` = 1 - Var(R - V) / Var(R).
    """
    values = values.float()
    old_values, returns = old_values.detach().float(), returns.detach().float()
    # clamp V itself, not V_old + clamp(V - V_old): inside the range V_clip is then V
    # exactly, and the clipped error never exceeds the unclipped one by a rounding of
    # V_old + (V - V_old) (frequent near 0, which would count as a clipped token)
    clipped_values = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    unclipped_error = (values - returns).pow(2)
    clipped_error = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        residual = returns - values
        residual_var = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
        returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        metrics = {
            "value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask),
            "explained_variance": 1.0 - residual_var / returns_var.clamp(min=1e-8),
        }
    return loss, metrics


def grpo_loss(
    logps: torch.Tensor,  # (N, T) current policy
    old_logps: torch.Tensor,  # (N, T) behaviour policy
    ref_logps: torch.Tensor | None,  # (N, T) reference policy; None if kl_coef == 0
    advantages: torch.Tensor,  # (N,) one per sequence, broadcast over its tokens
    mask: torch.Tensor,  # (N, T)
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    aggregation: Literal["sequence_mean", "constant"] = "sequence_mean",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO per-token loss with the KL penalty inside the loss.

    l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta [pi_ref/pi - log(pi_ref/pi) - 1]_t
    "sequence_mean" (GRPO):   L = 1/N sum_i 1/|o_i| sum_t l_{i,t}
    "constant" (Dr.GRPO):     L = sum_{i,t} l_{i,t} / (N L_max)

    Shao et al., arXiv 2402.03300, Eq. 3-4 (the KL term is the k3 estimator with the
    current pi_theta); Liu et al., arXiv 2503.20783 for the constant normaliser. L_max is
    ``max_completion_length`` (default: the padded length T; pass the generation limit so
    the normaliser does not change with the batch).
    """
    mask = mask.float()
    logps = logps.float()
    advantages = advantages.detach().float()[:, None]  # (N, 1)
    log_ratio = logps - old_logps.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    token_kl = torch.zeros_like(per_token)
    if kl_coef:
        if ref_logps is None:
            raise ValueError("grpo_loss needs ref_logps when kl_coef != 0")
        token_kl = kl_estimate(logps, ref_logps.detach(), "k3")
        per_token = per_token + kl_coef * token_kl
    if aggregation == "sequence_mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif aggregation == "constant":
        normaliser = max_completion_length if max_completion_length else mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * normaliser)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected sequence_mean or constant")
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped < unclipped).float(), mask),
            "kl": masked_mean(token_kl, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def reinforce_loss(
    sequence_logps: torch.Tensor,  # (N,) S_theta(y) summed over completion tokens
    advantages: torch.Tensor,  # (N,) e.g. R - b, or rloo_advantages(R).flatten()
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE with a baseline: L = -mean_i (R_i - b) S_theta(y_i).

    Williams 1992; the RLOO form is Ahmadian et al., arXiv 2402.14740. The caller forms
    the advantages (R - b); they are detached here.
    """
    advantages = advantages.detach().float()
    loss = -(advantages * sequence_logps.float()).mean()
    metrics = {"advantage_mean": advantages.mean(), "advantage_std": advantages.std(correction=0)}
    return loss, metrics


# ---------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Proportional controller of the KL coefficient towards a target KL.

    e = clip(KL / KL_target - 1, -0.2, 0.2);   beta <- beta (1 + e n_steps / horizon)

    Ziegler et al., arXiv 1909.08593, section 2.2. ``current_kl`` is the batch mean of
    the sequence-summed KL; ``n_steps`` the number of episodes in the update.
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


class FixedKLController:
    """Constant KL coefficient (the N+ details use 0.05, arXiv 2403.17031)."""

    def __init__(self, kl_coef: float = 0.05):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
