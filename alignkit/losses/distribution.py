"""Distribution-matching losses: fit pi_theta to a target p(y) = P(y) / Z by forward KL from
samples of a proposal q (DPG / GDC, GDC++, BRAIn, SNIS-DPG), plus the estimates that drive
them (partition function Z, KL(p || pi)) and GDC's moment matching of lambda.

Pure functions (ALGORITHMS.md section 7). Log-probs are sequence sums:
``policy_logps`` = S_theta(y), ``proposal_logps`` = log q(y), ``target_logps`` = log P(y)
(unnormalised; e.g. S_a(y) + log b(y), S_a(y) + lambda . phi(y), or S_sft(y) + r(x, y)).
Importance weights are computed in log space, in fp32, and detached.
"""

from __future__ import annotations

import math

import torch

Metrics = dict[str, torch.Tensor]


def _effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 along the last dim, from log-weights."""
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def dpg_loss(
    policy_logps: torch.Tensor,  # (N,) S_theta(y), y ~ q
    target_logps: torch.Tensor,  # (N,) log P(y), unnormalised target
    proposal_logps: torch.Tensor,  # (N,) log q(y)
) -> tuple[torch.Tensor, Metrics]:
    """Off-policy distributional policy gradient (DPG, as used by GDC).

    w_i = exp(log P(y_i) - log q(y_i))   (detached)
    L = -mean_i w_i S_theta(y_i),   so E_q[grad L] = -sum_y P(y) grad log pi(y)
                                                  = Z grad KL(p || pi_theta)

    Parshakova et al., arXiv 1912.08517; Khalifa et al. (GDC), arXiv 2012.11635, Alg. 1.
    Metrics: ``importance_weight_mean`` (a one-batch estimate of Z) and the effective
    sample size fraction.
    """
    policy_logps = policy_logps.float()
    log_weights = (target_logps.float() - proposal_logps.float()).detach()
    weights = torch.exp(log_weights)
    loss = -(weights * policy_logps).mean()
    metrics = {
        "importance_weight_mean": weights.mean(),
        "ess_fraction": _effective_sample_size(log_weights) / log_weights.numel(),
    }
    return loss, metrics


def gdc_pp_loss(
    policy_logps: torch.Tensor,  # (N,) S_theta(y), y ~ q
    target_logps: torch.Tensor,  # (N,) log P(y)
    proposal_logps: torch.Tensor,  # (N,) log q(y)
    log_partition: torch.Tensor | float,  # () log Z estimate
) -> tuple[torch.Tensor, Metrics]:
    """DPG with a baseline (GDC++).

    advantage_i = P(y_i)/q(y_i) - Z pi_theta(y_i)/q(y_i)   (detached)
    L = -mean_i advantage_i S_theta(y_i)

    Korbak et al., "On RL and Distribution Matching for Fine-Tuning LMs with no Catastrophic
    Forgetting", arXiv 2206.00761. The baseline term has zero expectation under q
    (E_q[pi/q grad log pi] = grad sum_y pi(y) = 0), so the expected gradient is DPG's.
    """
    policy_logps = policy_logps.float()
    proposal_logps = proposal_logps.float().detach()
    log_partition = torch.as_tensor(log_partition, dtype=torch.float32)
    importance_weights = torch.exp(target_logps.float().detach() - proposal_logps)
    baseline = torch.exp(log_partition + policy_logps.detach() - proposal_logps)
    advantages = importance_weights - baseline
    loss = -(advantages * policy_logps).mean()
    metrics = {
        "importance_weight_mean": importance_weights.mean(),
        "baseline_mean": baseline.mean(),
        "advantage_mean": advantages.mean(),
        "advantage_std": advantages.std(correction=0),
    }
    return loss, metrics


def update_log_partition(
    target_logps: torch.Tensor,  # (N,) log P(y), y ~ q
    proposal_logps: torch.Tensor,  # (N,) log q(y)
    log_partition: float | None,
    num_samples_seen: int,
) -> tuple[float, int]:
    """Running estimate of log Z = log E_q[P/q], the mean over every sample seen so far.

    Z_new = (n Z_old + sum_i P(y_i)/q(y_i)) / (n + N), computed in log space.

    GDC, arXiv 2012.11635 (Z is estimated by importance sampling from q and averaged over
    training). Start with ``log_partition=None, num_samples_seen=0``. Returns the new
    (log Z, n).
    """
    log_weights = (target_logps.float() - proposal_logps.float()).detach()
    batch_log_sum = torch.logsumexp(log_weights, 0).item()
    if log_partition is None or num_samples_seen == 0:
        total_log_sum = batch_log_sum
    else:
        previous_log_sum = log_partition + math.log(num_samples_seen)
        total_log_sum = max(previous_log_sum, batch_log_sum) + math.log1p(
            math.exp(-abs(previous_log_sum - batch_log_sum))
        )
    num_samples = num_samples_seen + log_weights.numel()
    return total_log_sum - math.log(num_samples), num_samples


def forward_kl_estimate(
    target_logps: torch.Tensor,  # (N,) log P(y), y ~ q
    proposal_logps: torch.Tensor,  # (N,) log q(y)
    model_logps: torch.Tensor,  # (N,) log of the model whose KL from p is estimated
    log_partition: torch.Tensor | float,  # () log Z
) -> torch.Tensor:  # ()
    """Importance-sampled forward KL from the target p = P/Z to a model m.

    KL(p || m) = E_p[log P - log Z - log m] ~= -log Z + (1/Z) mean_i[(P/q)(log P - log m)]

    GDC's KL-adaptive proposal (arXiv 2012.11635): estimate KL(p || pi_theta) and
    KL(p || q) (``model_logps = proposal_logps``) on q-samples and replace q by pi_theta
    when the former is smaller. Detached.
    """
    target_logps = target_logps.detach().float()
    proposal_logps = proposal_logps.detach().float()
    model_logps = model_logps.detach().float()
    log_partition = torch.as_tensor(log_partition, dtype=torch.float32)
    weights = torch.exp(target_logps - proposal_logps - log_partition)  # p/q
    return -log_partition + (weights * (target_logps - model_logps)).mean()


def brain_loss(
    policy_logps: torch.Tensor,  # (B, n) S_theta(y_i | x), n samples per prompt
    target_logps: torch.Tensor,  # (B, n) log p_sft(y_i | x) + r(x, y_i)
    proposal_logps: torch.Tensor,  # (B, n) log q(y_i | x)
) -> tuple[torch.Tensor, Metrics]:
    """BRAIn: self-normalised distillation of the reward-conditioned posterior with a
    self-normalised baseline.

    log alpha_i = log P(y_i) - log q(y_i),      alpha^ = softmax_i(log alpha)   (detached)
    log beta_i  = S_theta(y_i) - log q(y_i),    beta^  = softmax_i(log beta)    (detached)
    L = mean_x[ -sum_i (alpha^_i - beta^_i) S_theta(y_i | x) ]

    Pandey et al., arXiv 2402.02479. The softmax runs over the n samples of each prompt
    (dim 1). For the posterior p_sft exp(r), pass ``target_logps = sft_logps + rewards``.
    Since sum_i (alpha^_i - beta^_i) = 0, beta^ is a baseline; with q = p_sft, n = 2 and
    one-hot alpha^ this is the DPO gradient at beta = 1.
    """
    policy_logps = policy_logps.float()
    proposal_logps = proposal_logps.detach().float()
    log_alpha = target_logps.detach().float() - proposal_logps
    log_beta = policy_logps.detach() - proposal_logps
    alpha = torch.softmax(log_alpha, dim=1)
    beta = torch.softmax(log_beta, dim=1)
    loss = -((alpha - beta) * policy_logps).sum(1).mean()
    metrics = {
        "alpha_ess": _effective_sample_size(log_alpha).mean(),
        "beta_ess": _effective_sample_size(log_beta).mean(),
        "alpha_beta_tvd": 0.5 * (alpha - beta).abs().sum(1).mean(),
    }
    return loss, metrics


def snis_dpg_loss(
    policy_logps: torch.Tensor,  # (B, n) S_theta(y_i | x)
    target_logps: torch.Tensor,  # (B, n) log P(y_i | x)
    proposal_logps: torch.Tensor,  # (B, n) log q(y_i | x)
) -> tuple[torch.Tensor, Metrics]:
    """Self-normalised DPG: BRAIn without the beta^ baseline.

    alpha^ = softmax_i(log P(y_i) - log q(y_i))   (detached, per prompt)
    L = mean_x[ -sum_i alpha^_i S_theta(y_i | x) ]

    Pandey et al., arXiv 2402.02479 (the baseline-free estimator they compare against).
    """
    policy_logps = policy_logps.float()
    log_alpha = (target_logps.float() - proposal_logps.float()).detach()
    alpha = torch.softmax(log_alpha, dim=1)
    loss = -(alpha * policy_logps).sum(1).mean()
    return loss, {"alpha_ess": _effective_sample_size(log_alpha).mean()}


def moment_matching_step(
    features: torch.Tensor,  # (N, F) phi(x_j), x_j ~ a
    lambdas: torch.Tensor,  # (F,)
    target_moments: torch.Tensor,  # (F,) desired E_p[phi]
    learning_rate: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """One SNIS step of GDC's moment matching for P(x) = a(x) exp(lambda . phi(x)).

    w_j = softmax_j(lambda . phi(x_j)),   mu^ = sum_j w_j phi(x_j)
    lambda <- lambda + eta (mu_bar - mu^)

    Khalifa et al., arXiv 2012.11635, section 2.2 (eta = 0.5; stop when
    ||mu_bar - mu^|| < 0.01). Returns the new lambdas and metrics ``moment_error``
    (the norm before the step) and ``estimated_moments``.
    """
    features = features.detach().float()
    lambdas = lambdas.detach().float()
    target_moments = target_moments.detach().float()
    weights = torch.softmax(features @ lambdas, dim=0)  # (N,)
    estimated_moments = weights @ features  # (F,)
    error = target_moments - estimated_moments
    new_lambdas = lambdas + learning_rate * error
    return new_lambdas, {"moment_error": error.norm(), "estimated_moments": estimated_moments}


def fit_moment_matching(
    features: torch.Tensor,  # (N, F) phi(x_j), x_j ~ a
    target_moments: torch.Tensor,  # (F,)
    learning_rate: float = 0.5,
    tolerance: float = 0.01,
    max_steps: int = 10000,
) -> tuple[torch.Tensor, Metrics]:
    """Iterate :func:`moment_matching_step` from lambda = 0 until ||mu_bar - mu^|| < tol.

    Metrics: ``steps`` (updates applied), final ``moment_error`` and ``converged`` (1.0 or 0.0).
    """
    lambdas = torch.zeros(features.shape[1], dtype=torch.float32, device=features.device)
    updates = 0
    while True:
        new_lambdas, step_metrics = moment_matching_step(
            features, lambdas, target_moments, learning_rate
        )
        error = step_metrics["moment_error"]  # at the current lambdas
        if error < tolerance or updates == max_steps:
            break
        lambdas = new_lambdas
        updates += 1
    metrics = {
        "steps": torch.tensor(float(updates)),
        "moment_error": error,
        "converged": torch.tensor(float(error < tolerance)),
    }
    return lambdas, metrics
