"""Preference losses against numbers worked by hand from each paper's equation."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from alignkit.losses.preference import (
    PAIRWISE_LOSS_SPECS,
    PAIRWISE_LOSSES,
    bradley_terry_loss,
    cdpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    plackett_luce_loss,
    ranking_bradley_terry_loss,
    robust_dpo_loss,
    rpo_loss,
    simpo_loss,
)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), for the hand computations."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Two pairs used by the DPO family (sequence sums):
#   pair 0: S_w=-1, S_l=-3, ref_w=-2, ref_l=-3  -> rho_w = 1,  rho_l = 0, h = 1
#   pair 1: S_w=-5, S_l=-2, ref_w=-4, ref_l=-4  -> rho_w = -1, rho_l = 2, h = -3
CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = t(-1, -5), t(-3, -2), t(-2, -4), t(-3, -4)


# ----------------------------------------------------------------------------- reward models


def test_bradley_terry_by_hand():
    # r_w - r_l = [2 - 1, 0.5 - 1.5] = [1, -1]
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-1) = log(1 + e) = 1.313262
    loss, metrics = bradley_terry_loss(t(2.0, 0.5), t(1.0, 1.5))
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert metrics["rewards/accuracy"].item() == 0.5
    assert metrics["rewards/margin"].item() == pytest.approx(0.0, abs=1e-7)


def test_bradley_terry_margin_and_centering_by_hand():
    # margin m = [0.5, 0]: logits [1 - 0.5, -1] = [0.5, -1]
    # log(1 + e^-0.5) = 0.474077; log(1 + e) = 1.313262; mean = 0.893670
    loss, _ = bradley_terry_loss(t(2.0, 0.5), t(1.0, 1.5), margin=t(0.5, 0.0))
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(1)) / 2, abs=1e-6)
    # centering eta = 0.01: (r_w + r_l)^2 = [3^2, 2^2] = [9, 4], mean 6.5 -> + 0.065
    loss, _ = bradley_terry_loss(t(2.0, 0.5), t(1.0, 1.5), center_coef=0.01)
    assert loss.item() == pytest.approx(0.813262 + 0.065, abs=1e-6)


def test_ranking_bradley_terry_by_hand_with_short_ranking():
    # Row 0, scores best first [3, 1, 2]; pairs (0,1): 2, (0,2): 1, (1,2): -1
    #   losses log(1+e^-2)=0.126928, log(1+e^-1)=0.313262, log(1+e^1)=1.313262; mean 0.584484
    # Row 1, mask [1, 1, 0] on scores [0, 1, 99]: one pair (0,1): 0 - 1 = -1 -> 1.313262
    # batch mean = (0.584484 + 1.313262) / 2 = 0.948873
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = ranking_bradley_terry_loss(scores, mask)
    row0 = (softplus(-2) + softplus(-1) + softplus(1)) / 3
    row1 = softplus(1)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert metrics["rewards/pairs"].item() == 4
    assert metrics["rewards/accuracy"].item() == pytest.approx(2 / 4)


def test_plackett_luce_by_hand_with_short_ranking():
    # Row 0 [3, 1, 2]: -[(3 - lse(3,1,2)) + (1 - lse(1,2))]
    #   lse(3,1,2) = 3.407606, lse(1,2) = 2.313262 -> 0.407606 + 1.313262 = 1.720868
    # Row 1 [0, 1, pad]: -(0 - lse(0,1)) = log(1 + e) = 1.313262; mean = 1.517065
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = plackett_luce_loss(scores, mask)
    lse312 = math.log(math.exp(3) + math.exp(1) + math.exp(2))
    lse12 = math.log(math.exp(1) + math.exp(2))
    row0 = -((3 - lse312) + (1 - lse12))
    row1 = softplus(1)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-5)
    assert loss.item() == pytest.approx(1.517065, abs=1e-5)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[1, 2].item() == 0.0  # padding gets no gradient


def test_plackett_luce_with_two_items_is_bradley_terry():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 2, generator=generator) * 3
    pl_loss, _ = plackett_luce_loss(scores)
    bt_loss, _ = bradley_terry_loss(scores[:, 0], scores[:, 1])
    ranking_loss, _ = ranking_bradley_terry_loss(scores)
    torch.testing.assert_close(pl_loss, bt_loss)
    torch.testing.assert_close(ranking_loss, bt_loss)


# ----------------------------------------------------------------------------- DPO family


def test_dpo_by_hand():
    # beta h = [0.1, -0.3]; -log sigmoid(0.1) = 0.644397, -log sigmoid(-0.3) = 0.854355
    loss, metrics = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    assert loss.item() == pytest.approx((softplus(-0.1) + softplus(0.3)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.749376, abs=1e-6)
    # implicit rewards beta*rho: chosen [0.1, -0.1] mean 0; rejected [0, 0.2] mean 0.1
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1, abs=1e-7)
    assert metrics["rewards/accuracy"].item() == 0.5
    assert metrics["rewards/margin"].item() == pytest.approx((0.1 - 0.3) / 2, abs=1e-7)
    assert metrics["logps/chosen"].item() == pytest.approx(-3.0)


def test_dpo_gradient_by_hand():
    # d/dS_w [-log sigmoid(beta h)] = -beta sigmoid(-beta h) = -0.1 * sigmoid(-0.1) = -0.047502
    chosen, rejected = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, t(-2.0), t(-3.0), beta=0.1)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.1 * sigmoid(-0.1), abs=1e-7)
    assert rejected.grad.item() == pytest.approx(0.1 * sigmoid(-0.1), abs=1e-7)


def test_cdpo_by_hand_and_zero_smoothing_is_dpo():
    # eps = 0.1, beta h = 0.1: 0.9 * log(1+e^-0.1) + 0.1 * log(1+e^0.1)
    #   = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    loss, _ = cdpo_loss(t(-1), t(-3), t(-2), t(-3), beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-0.1) + 0.1 * softplus(0.1), abs=1e-6)
    assert loss.item() == pytest.approx(0.654397, abs=1e-6)
    generator = torch.Generator().manual_seed(1)
    logps = [torch.randn(8, generator=generator) * 5 for _ in range(4)]
    torch.testing.assert_close(
        cdpo_loss(*logps, beta=0.3, label_smoothing=0.0)[0], dpo_loss(*logps, beta=0.3)[0]
    )


def test_robust_dpo_by_hand():
    # eps = 0.1, beta h = 0.1: [0.9 * 0.644397 - 0.1 * 0.744397] / 0.8 = 0.631897
    loss, _ = robust_dpo_loss(t(-1), t(-3), t(-2), t(-3), beta=0.1, label_smoothing=0.1)
    expected = (0.9 * softplus(-0.1) - 0.1 * softplus(0.1)) / 0.8
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.631897, abs=1e-6)
    with pytest.raises(ValueError):
        robust_dpo_loss(t(-1), t(-3), t(-2), t(-3), label_smoothing=0.5)


def test_ipo_by_hand():
    # tau = 0.1 -> 1/(2 tau) = 5; h = [1, -3]: (1-5)^2 = 16, (-3-5)^2 = 64; mean 40
    loss, _ = ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    assert loss.item() == pytest.approx(40.0, abs=1e-4)


def test_hinge_by_hand():
    # h = [1, -3, 20], beta = 0.1: relu(0.9) = 0.9, relu(1.3) = 1.3, relu(1 - 2) = 0
    # mean = 2.2 / 3 = 0.733333
    loss, _ = hinge_loss(t(-1, -5, 0), t(-3, -2, -20), t(-2, -4, 0), t(-3, -4, 0), beta=0.1)
    assert loss.item() == pytest.approx(2.2 / 3, abs=1e-6)


def test_simpo_by_hand():
    # beta = 2, gamma = beta * 0.5 = 1
    # pair 0: A_w=-0.5, A_l=-1.0: 2 * 0.5 - 1 = 0 -> log 2 = 0.693147
    # pair 1: A_w=-1.0, A_l=-0.8: 2 * -0.2 - 1 = -1.4 -> log(1 + e^1.4) = 1.620417
    loss, metrics = simpo_loss(t(-0.5, -1.0), t(-1.0, -0.8), beta=2.0, gamma_beta_ratio=0.5)
    assert loss.item() == pytest.approx((math.log(2) + softplus(1.4)) / 2, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0 * (-0.75), abs=1e-6)


def test_orpo_by_hand():
    # lo_w = -0.5 - log(1 - e^-0.5) = -0.5 + 0.932752 = 0.432752
    # lo_l = -1.0 - log(1 - e^-1)   = -1.0 + 0.458675 = -0.541325
    # lo_w - lo_l = 0.974077; -log sigmoid(0.974077) = log(1 + e^-0.974077) = 0.320300
    # L = NLL_w + lambda * 0.317577 = 0.5 + 0.1 * 0.320300 = 0.532030
    loss, metrics = orpo_loss(t(-0.5), t(-1.0), chosen_nll=t(0.5), beta=0.1)
    log_odds_w = -0.5 - math.log(1 - math.exp(-0.5))
    log_odds_l = -1.0 - math.log(1 - math.exp(-1.0))
    expected = 0.5 + 0.1 * softplus(-(log_odds_w - log_odds_l))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.532030, abs=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(log_odds_w - log_odds_l, abs=1e-6)


def test_log1mexp_matches_math_and_orpo_is_finite_at_extremes():
    xs = [-1e-6, -1e-3, -0.1, -0.69, -0.7, -5.0, -50.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32))
    for value, x in zip(got.tolist(), xs, strict=True):
        assert value == pytest.approx(math.log(-math.expm1(x)), rel=1e-4)
    chosen = t(-1e-9, -60.0).requires_grad_()
    rejected = t(-60.0, 0.0).requires_grad_()
    loss, _ = orpo_loss(chosen, rejected, chosen_nll=t(0.0, 60.0), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all()


def test_rpo_by_hand_and_zero_alpha_is_dpo():
    # L = DPO + alpha * mean(NLL) = 0.749376 + 1.0 * (0.4 + 0.6) / 2 = 1.249376
    loss, metrics = rpo_loss(
        CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, chosen_nll=t(0.4, 0.6), beta=0.1, nll_coef=1.0
    )
    assert loss.item() == pytest.approx((softplus(-0.1) + softplus(0.3)) / 2 + 0.5, abs=1e-6)
    assert metrics["nll_loss"].item() == pytest.approx(0.5)
    generator = torch.Generator().manual_seed(2)
    logps = [torch.randn(8, generator=generator) * 5 for _ in range(4)]
    nll = torch.rand(8, generator=generator)
    rpo_zero, _ = rpo_loss(*logps, chosen_nll=nll, beta=0.2, nll_coef=0.0)
    torch.testing.assert_close(rpo_zero, dpo_loss(*logps, beta=0.2)[0])


def test_kto_by_hand():
    # r = [-1 - -2, -2 - -1] = [1, -1]; mismatched ratios [-3 - -4, -4 - -4] = [1, 0]
    # z0 = max(0, mean [1, 0]) = 0.5
    # desirable (row 0): 1 * (1 - sigmoid(0.1 * (1 - 0.5)))  = 1 - sigmoid(0.05) = 0.487503
    # undesirable (row 1): 2 * (1 - sigmoid(0.1 * (0.5 + 1))) = 2 * (1 - sigmoid(0.15)) = 0.925140
    # mean = 0.706321
    loss, metrics = kto_loss(
        t(-1, -2),
        t(-2, -1),
        torch.tensor([True, False]),
        t(-3, -4),
        t(-4, -4),
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    expected = ((1 - sigmoid(0.05)) + 2 * (1 - sigmoid(0.15))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.706321, abs=1e-6)
    assert metrics["kl_reference_point"].item() == pytest.approx(0.5)
    # Negative mismatched mean is clamped: z0 = max(0, -1) = 0 -> 1 - sigmoid(0.1) = 0.475021
    loss, metrics = kto_loss(t(-1), t(-2), torch.tensor([True]), t(-5), t(-4), beta=0.1)
    assert loss.item() == pytest.approx(1 - sigmoid(0.1), abs=1e-6)
    assert metrics["kl_reference_point"].item() == 0.0


def test_kto_reference_point_is_detached():
    policy = t(-1, -2).requires_grad_()
    mismatched = t(-3, -4).requires_grad_()
    loss, _ = kto_loss(policy, t(-2, -1), torch.tensor([True, False]), mismatched, t(-4, -4))
    policy_grad, mismatched_grad = torch.autograd.grad(
        loss, [policy, mismatched], allow_unused=True
    )
    assert policy_grad is not None and policy_grad.abs().sum() > 0
    assert mismatched_grad is None


# ----------------------------------------------------------------------------- registry


def _pairwise_inputs(spec, generator):
    """Random inputs for a loss, with grad on the policy log-probs only."""
    kwargs = {
        "chosen_logps": (-torch.rand(6, generator=generator) - 0.1).requires_grad_(),
        "rejected_logps": (-torch.rand(6, generator=generator) - 0.1).requires_grad_(),
    }
    if spec.needs_reference:
        kwargs["ref_chosen_logps"] = (-torch.rand(6, generator=generator)).requires_grad_()
        kwargs["ref_rejected_logps"] = (-torch.rand(6, generator=generator)).requires_grad_()
    if spec.needs_chosen_nll:
        kwargs["chosen_nll"] = torch.rand(6, generator=generator)
    return kwargs


@pytest.mark.parametrize("name", sorted(PAIRWISE_LOSSES))
def test_registry_spec_matches_signature_and_gradients_reach_policy_only(name):
    fn, spec = PAIRWISE_LOSSES[name], PAIRWISE_LOSS_SPECS[name]
    parameters = inspect.signature(fn).parameters
    assert set(spec.hyperparameters) <= set(parameters)
    assert ("ref_chosen_logps" in parameters) == spec.needs_reference
    assert ("chosen_nll" in parameters) == spec.needs_chosen_nll
    kwargs = _pairwise_inputs(spec, torch.Generator().manual_seed(3))
    loss, metrics = fn(**kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(not value.requires_grad for value in metrics.values())
    policy = [kwargs["chosen_logps"], kwargs["rejected_logps"]]
    reference = [kwargs[k] for k in ("ref_chosen_logps", "ref_rejected_logps") if k in kwargs]
    grads = torch.autograd.grad(loss, policy + reference, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    assert all(g is None for g in grads[2:])


def test_reference_free_losses_and_reductions():
    assert not PAIRWISE_LOSS_SPECS["simpo"].needs_reference
    assert not PAIRWISE_LOSS_SPECS["orpo"].needs_reference
    assert PAIRWISE_LOSS_SPECS["simpo"].logp_reduction == "mean"
    assert PAIRWISE_LOSS_SPECS["dpo"].logp_reduction == "sum"
    assert set(PAIRWISE_LOSSES) == set(PAIRWISE_LOSS_SPECS)


def test_losses_compute_in_fp32_from_bf16():
    loss, _ = dpo_loss(
        *(x.to(torch.bfloat16) for x in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED))
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.749376, abs=1e-6)
