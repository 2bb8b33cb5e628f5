"""Preference losses: reward-model losses (Bradley-Terry, ranking, Plackett-Luce) and the
offline DPO family (DPO, cDPO, rDPO, IPO, hinge, SimPO, ORPO, RPO, KTO).

Every function is a pure function of per-sequence log-probabilities or scores and returns
``(loss, metrics)``: a scalar loss (batch mean) and a dict of detached scalar tensors.
Inputs are cast to fp32. Conventions (ALGORITHMS.md sections 1-2):

- ``chosen_logps`` / ``rejected_logps``: policy log pi_theta(y | x) of the chosen (y_w) and
  rejected (y_l) completions, summed over completion tokens (S) or averaged per token (A)
  as the loss's :class:`PairwiseLossSpec` says. Shape ``(B,)``.
- ``ref_chosen_logps`` / ``ref_rejected_logps``: the same under the frozen reference model.
- rho_w = S_theta(y_w) - S_ref(y_w), rho_l likewise, h = rho_w - rho_l.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012).

    Uses log(-expm1(x)) for x > -log 2 and log1p(-exp(x)) below; both branches are
    evaluated on inputs where they are finite so that no NaN gradient leaks through
    ``torch.where``. x must be < 0 (x = 0 gives -inf).
    """
    x = _f32(x)
    near_zero = x > -math.log(2.0)
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _pair_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, prefix: str = "rewards"
) -> Metrics:
    """Detached summary of implicit or explicit rewards for a batch of pairs."""
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        f"{prefix}/chosen": chosen_rewards.mean(),
        f"{prefix}/rejected": rejected_rewards.mean(),
        f"{prefix}/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        f"{prefix}/margin": (chosen_rewards - rejected_rewards).mean(),
    }


# ---------------------------------------------------------------------------------------
# 1. Reward-model losses
# ---------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,  # (B,)
    rejected_rewards: torch.Tensor,  # (B,)
    margin: torch.Tensor | None = None,  # (B,)
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss with optional margin and reward centering.

    L = mean_b[ -log sigmoid(r_w - r_l - m) ] + eta * mean_b[ (r_w + r_l)^2 ]

    Bradley-Terry as in InstructGPT Eq. 1 (arXiv 2203.02155); the per-pair margin m from
    Llama 2 (arXiv 2307.09288); the centering term eta = ``center_coef`` from Eisenstein
    et al. Eq. 2 (arXiv 2312.09244), recommended 0.01.
    """
    chosen_rewards, rejected_rewards = _f32(chosen_rewards), _f32(rejected_rewards)
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - _f32(margin)
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).mean()
    metrics = _pair_metrics(chosen_rewards, rejected_rewards)
    return loss, metrics


def ranking_bradley_terry_loss(
    scores: torch.Tensor,  # (B, K) best first
    mask: torch.Tensor | None = None,  # (B, K) 1 = ranked completion
) -> tuple[torch.Tensor, Metrics]:
    """K-way ranking loss over all C(K,2) ordered pairs of each prompt (InstructGPT).

    L = mean_b[ -1/C(K_b,2) * sum_{i<j, both valid} log sigmoid(s_bi - s_bj) ]

    arXiv 2203.02155 Eq. 1. ``scores[b, i]`` is the reward of the i-th best completion of
    prompt b (column 0 is the most preferred). ``mask`` marks which columns hold a ranked
    completion, so rankings shorter than K are allowed; prompts with fewer than two valid
    completions contribute nothing. Ties must be dropped or merged before this call.
    """
    scores = _f32(scores)
    batch_size, num_ranked = scores.shape
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    upper = torch.triu(
        torch.ones(num_ranked, num_ranked, dtype=torch.bool, device=scores.device), 1
    )
    pair_mask = upper & mask[:, :, None] & mask[:, None, :]  # (B, K, K) i better than j
    differences = scores[:, :, None] - scores[:, None, :]  # (B, K, K) s_i - s_j
    pair_losses = -F.logsigmoid(differences) * pair_mask
    pairs_per_prompt = pair_mask.sum(dim=(1, 2))  # (B,)
    has_pairs = pairs_per_prompt > 0
    per_prompt = pair_losses.sum(dim=(1, 2)) / pairs_per_prompt.clamp(min=1)
    loss = per_prompt[has_pairs].mean() if has_pairs.any() else scores.sum() * 0.0
    correct = ((differences > 0) & pair_mask).sum()
    metrics = {
        "rewards/accuracy": (correct / pair_mask.sum().clamp(min=1)).detach().float(),
        "rewards/pairs": pair_mask.sum().detach().float(),
        "rewards/mean": scores[mask].detach().mean()
        if mask.any()
        else torch.zeros((), device=scores.device),
    }
    return loss, metrics


def plackett_luce_loss(
    scores: torch.Tensor,  # (B, K) best first
    mask: torch.Tensor | None = None,  # (B, K) valid columns form a prefix
) -> tuple[torch.Tensor, Metrics]:
    """Plackett-Luce ranking negative log-likelihood.

    L = mean_b[ -sum_{k=1}^{K_b-1} ( s_{b,k} - logsumexp_{j>=k} s_{b,j} ) ]

    DPO appendix A.3 (arXiv 2305.18290). Column 0 is the most preferred completion; the
    suffix logsumexp is a reversed ``logcumsumexp``. With K = 2 this is exactly the
    Bradley-Terry loss. ``mask`` must mark a prefix of each row (rankings shorter than K
    are padded on the right); ties must be removed beforehand.
    """
    scores = _f32(scores)
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    # Padding gets a very negative but finite score: exp(-1e9 - s) is exactly 0 in fp32,
    # and finite values keep the logcumsumexp backward free of NaN.
    padded = scores.masked_fill(~mask, -1e9)
    suffix_logsumexp = torch.logcumsumexp(padded.flip(-1), dim=-1).flip(-1)  # (B, K)
    # The term of the last valid position is s_k - s_k = 0, so summing all valid k is exact.
    terms = (scores - suffix_logsumexp) * mask
    loss = -terms.sum(dim=-1).mean()
    top_is_best = (padded.argmax(dim=-1) == 0).float()
    metrics = {"rewards/top1_accuracy": top_is_best.mean().detach()}
    return loss, metrics


# ---------------------------------------------------------------------------------------
# 2. Offline pairwise preference losses (the DPO family)
# ---------------------------------------------------------------------------------------


def _log_ratio_margin(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho_w, rho_l, h) in fp32; the reference terms are detached."""
    chosen_ratio = _f32(chosen_logps) - _f32(ref_chosen_logps).detach()
    rejected_ratio = _f32(rejected_logps) - _f32(ref_rejected_logps).detach()
    return chosen_ratio, rejected_ratio, chosen_ratio - rejected_ratio


def _dpo_metrics(
    beta: float,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    metrics = _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)
    metrics["logps/chosen"] = _mean(chosen_logps)
    metrics["logps/rejected"] = _mean(rejected_logps)
    return metrics


def dpo_loss(
    chosen_logps: torch.Tensor,  # (B,) sum
    rejected_logps: torch.Tensor,  # (B,) sum
    ref_chosen_logps: torch.Tensor,  # (B,) sum
    ref_rejected_logps: torch.Tensor,  # (B,) sum
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization.

    L = mean_b[ -log sigmoid(beta * h) ],  h = (S_w - S_ref,w) - (S_l - S_ref,l)

    Rafailov et al., arXiv 2305.18290, Eq. 7. Metrics are the implicit rewards
    beta * rho (detached): chosen, rejected, accuracy (rho_w > rho_l) and margin.
    """
    chosen_ratio, rejected_ratio, h = _log_ratio_margin(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = -F.logsigmoid(beta * h).mean()
    return loss, _dpo_metrics(beta, chosen_ratio, rejected_ratio, chosen_logps, rejected_logps)


def cdpo_loss(
    chosen_logps: torch.Tensor,  # (B,) sum
    rejected_logps: torch.Tensor,  # (B,) sum
    ref_chosen_logps: torch.Tensor,  # (B,) sum
    ref_rejected_logps: torch.Tensor,  # (B,) sum
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO: DPO with labels flipped with probability eps.

    L = mean_b[ -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) ]

    Mitchell, "A note on DPO with noisy preferences and relationship to IPO" (2023), Eq. 3
    (no arXiv id); eps = ``label_smoothing`` in [0, 0.5). eps = 0 is plain DPO.
    """
    chosen_ratio, rejected_ratio, h = _log_ratio_margin(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    return losses.mean(), _dpo_metrics(
        beta, chosen_ratio, rejected_ratio, chosen_logps, rejected_logps
    )


def robust_dpo_loss(
    chosen_logps: torch.Tensor,  # (B,) sum
    rejected_logps: torch.Tensor,  # (B,) sum
    ref_chosen_logps: torch.Tensor,  # (B,) sum
    ref_rejected_logps: torch.Tensor,  # (B,) sum
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (rDPO): an unbiased loss under preference flips with rate eps.

    L = mean_b[ (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps) ]

    Chowdhury et al., arXiv 2403.00409; eps = ``label_smoothing`` < 0.5.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio, h = _log_ratio_margin(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        + label_smoothing * F.logsigmoid(-beta * h)
    ) / (1.0 - 2.0 * label_smoothing)
    return losses.mean(), _dpo_metrics(
        beta, chosen_ratio, rejected_ratio, chosen_logps, rejected_logps
    )


def ipo_loss(
    chosen_logps: torch.Tensor,  # (B,) mean per token (see PAIRWISE_LOSS_SPECS)
    rejected_logps: torch.Tensor,  # (B,) mean per token
    ref_chosen_logps: torch.Tensor,  # (B,) mean per token
    ref_rejected_logps: torch.Tensor,  # (B,) mean per token
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimization.

    L = mean_b[ (h - 1 / (2 tau))^2 ],  tau = ``beta``

    Azar et al., arXiv 2310.12036, Eq. 17. The paper uses sequence sums; the registered
    spec uses per-token means, as TRL does (confirmed with the IPO authors).
    """
    chosen_ratio, rejected_ratio, h = _log_ratio_margin(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = (h - 1.0 / (2.0 * beta)).pow(2).mean()
    return loss, _dpo_metrics(beta, chosen_ratio, rejected_ratio, chosen_logps, rejected_logps)


def hinge_loss(
    chosen_logps: torch.Tensor,  # (B,) sum
    rejected_logps: torch.Tensor,  # (B,) sum
    ref_chosen_logps: torch.Tensor,  # (B,) sum
    ref_rejected_logps: torch.Tensor,  # (B,) sum
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Hinge preference loss on the DPO log-ratio margin (the DPO-repo / TRL "hinge").

    L = mean_b[ relu(1 - beta h) ]

    A reference-model form of SLiC-HF's calibration loss (Zhao et al., arXiv 2305.10425),
    with margin delta = 1 / beta.
    """
    chosen_ratio, rejected_ratio, h = _log_ratio_margin(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = F.relu(1.0 - beta * h).mean()
    return loss, _dpo_metrics(beta, chosen_ratio, rejected_ratio, chosen_logps, rejected_logps)


def simpo_loss(
    chosen_logps: torch.Tensor,  # (B,) mean per token
    rejected_logps: torch.Tensor,  # (B,) mean per token
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization: length-normalised, reference-free.

    L = mean_b[ -log sigmoid(beta (A_w - A_l) - gamma) ],  gamma = beta * gamma_beta_ratio

    Meng et al., arXiv 2405.14734, Eq. 6. A = mean per-token log-prob of the completion.
    Implicit rewards are beta * A.
    """
    chosen_logps, rejected_logps = _f32(chosen_logps), _f32(rejected_logps)
    logits = beta * (chosen_logps - rejected_logps) - beta * gamma_beta_ratio
    loss = -F.logsigmoid(logits).mean()
    metrics = _pair_metrics(beta * chosen_logps, beta * rejected_logps)
    metrics["logps/chosen"] = _mean(chosen_logps)
    metrics["logps/rejected"] = _mean(rejected_logps)
    return loss, metrics


def orpo_loss(
    chosen_logps: torch.Tensor,  # (B,) mean per token, < 0
    rejected_logps: torch.Tensor,  # (B,) mean per token, < 0
    chosen_nll: torch.Tensor,  # (B,) token-mean cross-entropy of the chosen completion
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization, reference-free.

    lo = A - log(1 - exp(A))   (log-odds of the geometric-mean token probability)
    L = mean_b[ NLL_w - lambda * log sigmoid(lo_w - lo_l) ],  lambda = ``beta``

    Hong et al., arXiv 2403.07691, Eq. 6-7. log(1 - exp(A)) uses :func:`log1mexp`;
    A is clamped to <= -1e-6 so that a probability-1 completion gives a finite loss.
    """
    chosen_logps = _f32(chosen_logps).clamp(max=-1e-6)
    rejected_logps = _f32(rejected_logps).clamp(max=-1e-6)
    log_odds_chosen = chosen_logps - log1mexp(chosen_logps)
    log_odds_rejected = rejected_logps - log1mexp(rejected_logps)
    log_odds_ratio = log_odds_chosen - log_odds_rejected
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio)
    nll = _f32(chosen_nll)
    loss = (nll + beta * odds_ratio_loss).mean()
    metrics = _pair_metrics(beta * chosen_logps, beta * rejected_logps)
    metrics["log_odds_ratio"] = _mean(log_odds_ratio)
    metrics["nll_loss"] = _mean(nll)
    metrics["odds_ratio_loss"] = _mean(odds_ratio_loss)
    return loss, metrics


def rpo_loss(
    chosen_logps: torch.Tensor,  # (B,) sum
    rejected_logps: torch.Tensor,  # (B,) sum
    ref_chosen_logps: torch.Tensor,  # (B,) sum
    ref_rejected_logps: torch.Tensor,  # (B,) sum
    chosen_nll: torch.Tensor,  # (B,) token-mean cross-entropy of the chosen completion
    beta: float = 0.1,
    nll_coef: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Regularised preference optimisation: DPO plus NLL on the chosen completion.

    L = L_DPO + alpha * mean_b[ NLL_w ],  alpha = ``nll_coef`` (paper v3 recommends 1.0)

    Pang et al., arXiv 2404.19733. alpha = 0 is plain DPO.
    """
    loss, metrics = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    nll = _f32(chosen_nll)
    metrics["nll_loss"] = _mean(nll)
    return loss + nll_coef * nll.mean(), metrics


def kto_loss(
    policy_logps: torch.Tensor,  # (B,) sum, completion y_i for prompt x_i
    ref_logps: torch.Tensor,  # (B,) sum
    desirable: torch.Tensor,  # (B,) bool
    mismatched_policy_logps: torch.Tensor,  # (B,) sum, y_{i+1} scored for prompt x_i
    mismatched_ref_logps: torch.Tensor,  # (B,) sum
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky Optimization on unpaired desirable / undesirable completions.

    r = S_theta(y|x) - S_ref(y|x)
    z0 = max(0, mean_j[ S_theta(y'_j|x_j) - S_ref(y'_j|x_j) ])   (detached; y' mismatched)
    L_b = lambda_D (1 - sigmoid(beta (r - z0)))  if desirable
          lambda_U (1 - sigmoid(beta (z0 - r)))  otherwise
    L = mean_b L_b

    Ethayarajh et al., arXiv 2402.01306, Eq. 8. The mismatched pairs (x_i, y_{i+1}) come from
    the same micro-batch, which therefore needs more than one example. Choose the weights so
    that lambda_D n_D / (lambda_U n_U) is in [1, 4/3].
    """
    log_ratio = _f32(policy_logps) - _f32(ref_logps).detach()
    mismatched_ratio = _f32(mismatched_policy_logps) - _f32(mismatched_ref_logps)
    reference_point = mismatched_ratio.mean().clamp(min=0).detach()
    desirable = desirable.bool()
    desirable_losses = desirable_weight * (
        1.0 - torch.sigmoid(beta * (log_ratio - reference_point))
    )
    undesirable_losses = undesirable_weight * (
        1.0 - torch.sigmoid(beta * (reference_point - log_ratio))
    )
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = (beta * log_ratio).detach()
    zero = torch.zeros((), device=rewards.device)
    metrics = {
        "kl_reference_point": reference_point,
        "rewards/desirable": rewards[desirable].mean() if desirable.any() else zero,
        "rewards/undesirable": rewards[~desirable].mean() if (~desirable).any() else zero,
        "fraction_desirable": desirable.float().mean(),
    }
    return losses.mean(), metrics


# ---------------------------------------------------------------------------------------
# 3. Registry for the pairwise (DPO-style) recipe
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairwiseLossSpec:
    """What a pairwise loss needs from the recipe."""

    needs_reference: bool
    """Pass ``ref_chosen_logps`` / ``ref_rejected_logps`` (else the reference model is skipped)."""
    logp_reduction: Literal["sum", "mean"]
    """Sequence log-prob: sum over completion tokens, or mean per completion token."""
    needs_chosen_nll: bool
    """Pass ``chosen_nll``: token-mean cross-entropy of the chosen completion."""
    hyperparameters: tuple[str, ...]
    """Keyword arguments of the loss beyond the log-probs."""


PAIRWISE_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "rdpo": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "rpo": rpo_loss,
}

PAIRWISE_LOSS_SPECS: dict[str, PairwiseLossSpec] = {
    "dpo": PairwiseLossSpec(True, "sum", False, ("beta",)),
    "cdpo": PairwiseLossSpec(True, "sum", False, ("beta", "label_smoothing")),
    "rdpo": PairwiseLossSpec(True, "sum", False, ("beta", "label_smoothing")),
    "ipo": PairwiseLossSpec(True, "mean", False, ("beta",)),
    "hinge": PairwiseLossSpec(True, "sum", False, ("beta",)),
    "simpo": PairwiseLossSpec(False, "mean", False, ("beta", "gamma_beta_ratio")),
    "orpo": PairwiseLossSpec(False, "mean", True, ("beta",)),
    "rpo": PairwiseLossSpec(True, "sum", True, ("beta", "nll_coef")),
}
