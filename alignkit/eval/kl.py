"""Sequence KL(pi || pi_ref) estimated from samples of pi.

For a completion y ~ pi(. | x) with tokens y_1..y_T, the per-token log-ratio is
``l_t = log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)``. Two estimators of
``KL(pi(. | x) || pi_ref(. | x))`` (Schulman, "Approximating KL divergence", 2020):

- k1: ``sum_t l_t``, unbiased, but single samples can be negative;
- k3: ``sum_t (r_t - 1 - log r_t)`` with ``r_t = exp(-l_t) = pi_ref / pi``: every term
  is >= 0, and by the chain rule each term is an unbiased estimate of that step's
  KL, so the sum is an unbiased, non-negative and lower-variance estimate of the
  sequence KL.

Both are averaged over samples. Log-probs are computed at the sampling temperature
(the KL between the two tempered distributions, which is what was sampled from).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alignkit.rollout import Rollout, score

DEFAULT_CHUNK_ROWS = 32


@dataclass
class SequenceKL:
    """KL(pi || pi_ref) in nats per completion, from N samples of pi."""

    k1_per_sample: np.ndarray  # (N,) sum_t log pi/pi_ref
    k3_per_sample: np.ndarray  # (N,) sum_t (r - 1 - log r), r = pi_ref/pi

    @property
    def k1(self) -> float:
        """Mean summed log-ratio (the plain Monte-Carlo estimate)."""
        return float(self.k1_per_sample.mean()) if self.k1_per_sample.size else math.nan

    @property
    def k3(self) -> float:
        """Mean summed k3 (non-negative, lower variance)."""
        return float(self.k3_per_sample.mean()) if self.k3_per_sample.size else math.nan


def rollout_rows(rollout: Rollout, start: int, stop: int) -> Rollout:
    """Rows ``[start, stop)`` of a rollout as a rollout of their own."""
    rows = slice(start, stop)
    return dataclasses.replace(
        rollout,
        input_ids=rollout.input_ids[rows],
        attention_mask=rollout.attention_mask[rows],
        completion_mask=rollout.completion_mask[rows],
        sampling_logps=rollout.sampling_logps[rows],
        finished=rollout.finished[rows],
        prompt_index=rollout.prompt_index[rows],
        completions=rollout.completions[rows],
        completion_lengths=rollout.completion_lengths[rows],
    )


def _completion_logps(
    model: nn.Module, rollout: Rollout, temperature: float, bf16: bool | None
) -> torch.Tensor:
    """log-probs of the completion tokens under ``model`` (eval mode, no grad).  # (n, L)"""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return score(model, rollout, temperature=temperature, bf16=bf16).logps
    finally:
        model.train(was_training)


def token_log_ratios(
    policy: nn.Module,
    reference: nn.Module,
    rollout: Rollout,
    temperature: float | None = None,
    bf16: bool | None = None,
) -> torch.Tensor:
    """``log pi - log pi_ref`` at each completion token, zero elsewhere.  # (N, P+T) fp32"""
    temperature = rollout.temperature if temperature is None else temperature
    mask = rollout.completion_mask.float()
    policy_logps = _completion_logps(policy, rollout, temperature, bf16)
    reference_logps = _completion_logps(reference, rollout, temperature, bf16)
    return (policy_logps - reference_logps) * mask


def sequence_kl(
    policy: nn.Module,
    reference: nn.Module,
    rollout: Rollout,
    temperature: float | None = None,
    bf16: bool | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> SequenceKL:
    """Estimate KL(pi || pi_ref) per completion from a rollout sampled from ``policy``.

    ``temperature`` defaults to the rollout's sampling temperature. Rows are scored in
    chunks of ``chunk_rows`` so memory stays small for large evaluations.
    """
    k1_parts, k3_parts = [], []
    for start in range(0, rollout.num_rows, chunk_rows):
        part = rollout_rows(rollout, start, min(start + chunk_rows, rollout.num_rows))
        log_ratio = token_log_ratios(policy, reference, part, temperature, bf16)  # (n, L)
        mask = part.completion_mask.float()
        # k3 per token with r = pi_ref / pi = exp(-log_ratio): r - 1 - log r
        k3_tokens = (torch.expm1(-log_ratio) + log_ratio) * mask
        k1_parts.append(log_ratio.sum(-1).double().cpu().numpy())
        k3_parts.append(k3_tokens.sum(-1).double().cpu().numpy())
    if not k1_parts:
        return SequenceKL(np.zeros(0), np.zeros(0))
    return SequenceKL(np.concatenate(k1_parts), np.concatenate(k3_parts))
