"""Distribution-matching losses: hand-worked numbers and exact expectations on toy
distributions small enough to enumerate."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.distribution import (
    brain_loss,
    dpg_loss,
    fit_moment_matching,
    forward_kl_estimate,
    gdc_pp_loss,
    moment_matching_step,
    snis_dpg_loss,
    update_log_partition,
)
from alignkit.losses.preference import dpo_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# A toy world of 3 outcomes. The proposal q = [1/2, 1/4, 1/4] is represented exactly by the
# sample list [0, 0, 1, 2]: a mean over these 4 samples is the exact expectation under q.
SAMPLES = torch.tensor([0, 0, 1, 2])
PROPOSAL_LOGPS = torch.log(t(0.5, 0.25, 0.25))
TARGET_LOGPS = torch.log(t(0.3, 0.6, 0.9))  # unnormalised P; Z = 1.8


def toy_policy(seed: int) -> torch.Tensor:
    """Logits theta of pi_theta = softmax(theta), with grad."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, generator=generator).requires_grad_()


def exact_forward_kl(target_logps: torch.Tensor, model_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || m) with p = P / Z, summed over every outcome."""
    target = target_logps - torch.logsumexp(target_logps, 0)
    return (target.exp() * (target - model_logps)).sum()


# ----------------------------------------------------------------------------- DPG / GDC++


def test_dpg_by_hand():
    # w = exp(logP - logq) = [e^(-1 + 1.5), e^(-3 + 2)] = [e^0.5, e^-1] = [1.648721, 0.367879]
    # L = -mean(w S) = -(1.648721 * -1 + 0.367879 * -2) / 2 = 1.192240; dL/dS = -w / 2
    policy_logps = t(-1.0, -2.0).requires_grad_()
    target_logps = t(-1.0, -3.0).requires_grad_()
    proposal_logps = t(-1.5, -2.0).requires_grad_()
    loss, metrics = dpg_loss(policy_logps, target_logps, proposal_logps)
    weights = [math.exp(0.5), math.exp(-1.0)]
    assert loss.item() == pytest.approx((weights[0] * 1 + weights[1] * 2) / 2, abs=1e-6)
    assert metrics["importance_weight_mean"].item() == pytest.approx(sum(weights) / 2, abs=1e-6)
    grads = torch.autograd.grad(
        loss, [policy_logps, target_logps, proposal_logps], allow_unused=True
    )
    torch.testing.assert_close(grads[0], -t(*weights) / 2)
    assert grads[1] is None and grads[2] is None


def test_gdc_pp_by_hand():
    # Z = 0.5: advantage = P/q - Z pi/q
    #   sample 0: e^0.5 - 0.5 e^(-1 + 1.5) = 0.5 e^0.5 = 0.824361
    #   sample 1: e^-1 - 0.5 e^(-2 + 2)    = 0.367879 - 0.5 = -0.132121
    # L = -mean(adv S) = -(0.824361 * -1 + -0.132121 * -2) / 2 = 0.280060
    policy_logps = t(-1.0, -2.0).requires_grad_()
    loss, _ = gdc_pp_loss(policy_logps, t(-1.0, -3.0), t(-1.5, -2.0), math.log(0.5))
    advantages = [0.5 * math.exp(0.5), math.exp(-1.0) - 0.5]
    assert loss.item() == pytest.approx((advantages[0] * 1 + advantages[1] * 2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.280060, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, [policy_logps])
    torch.testing.assert_close(grad, -t(*advantages) / 2)  # advantage is detached


@pytest.mark.parametrize("with_baseline", [False, True])
def test_dpg_expected_gradient_is_z_times_exact_forward_kl_gradient(with_baseline):
    # E_q[grad L] = -sum_x P(x) grad log pi(x) = Z grad KL(p || pi_theta), exactly.
    theta = toy_policy(0)
    policy_logps = torch.log_softmax(theta, 0)
    log_z = torch.logsumexp(TARGET_LOGPS, 0)  # log 1.8
    args = (policy_logps[SAMPLES], TARGET_LOGPS[SAMPLES], PROPOSAL_LOGPS[SAMPLES])
    loss, _ = gdc_pp_loss(*args, log_z) if with_baseline else dpg_loss(*args)
    (expected_gradient,) = torch.autograd.grad(loss, [theta])
    (kl_gradient,) = torch.autograd.grad(
        exact_forward_kl(TARGET_LOGPS, torch.log_softmax(theta, 0)), [theta]
    )
    torch.testing.assert_close(expected_gradient, 1.8 * kl_gradient)


# ----------------------------------------------------------------------------- Z and KL(p || .)


def test_update_log_partition_by_hand():
    # batch 1: P/q = [1, 3] -> Z = 4 / 2 = 2
    log_z, seen = update_log_partition(t(0.0, math.log(3)), t(0.0, 0.0), None, 0)
    assert (math.exp(log_z), seen) == (pytest.approx(2.0), 2)
    # batch 2: P/q = [5, 1] -> Z = (2 * 2 + 6) / 4 = 2.5
    log_z, seen = update_log_partition(t(math.log(5), 0.0), t(0.0, 0.0), log_z, seen)
    assert (math.exp(log_z), seen) == (pytest.approx(2.5), 4)


def test_partition_and_forward_kl_estimates_are_exact_under_exact_expectation():
    # Over the 4 samples representing q exactly: Z^ = sum_x P(x) = 1.8, and the KL estimate
    # equals the enumerated KL(p || pi) and KL(p || q).
    log_z, _ = update_log_partition(TARGET_LOGPS[SAMPLES], PROPOSAL_LOGPS[SAMPLES], None, 0)
    assert math.exp(log_z) == pytest.approx(1.8, abs=1e-6)
    policy_logps = torch.log_softmax(toy_policy(1).detach(), 0)
    kl_policy = forward_kl_estimate(
        TARGET_LOGPS[SAMPLES], PROPOSAL_LOGPS[SAMPLES], policy_logps[SAMPLES], log_z
    )
    kl_proposal = forward_kl_estimate(
        TARGET_LOGPS[SAMPLES], PROPOSAL_LOGPS[SAMPLES], PROPOSAL_LOGPS[SAMPLES], log_z
    )
    torch.testing.assert_close(kl_policy, exact_forward_kl(TARGET_LOGPS, policy_logps))
    torch.testing.assert_close(kl_proposal, exact_forward_kl(TARGET_LOGPS, PROPOSAL_LOGPS))
    # by hand: p = [1/6, 1/3, 1/2], q = [1/2, 1/4, 1/4]
    # KL(p || q) = 1/6 log(1/3) + 1/3 log(4/3) + 1/2 log 2 = 0.259366
    by_hand = math.log(1 / 3) / 6 + math.log(4 / 3) / 3 + math.log(2) / 2
    assert kl_proposal.item() == pytest.approx(by_hand, abs=1e-6)


# ----------------------------------------------------------------------------- BRAIn / SNIS


def test_brain_and_snis_dpg_by_hand():
    # one prompt, n = 2: S = [-1, -2], log q = [-1, -1], log P = [0, 0]
    # log alpha = [1, 1] -> alpha = [0.5, 0.5]
    # log beta = [0, -1] -> beta = [sigmoid(1), sigmoid(-1)] = [0.731059, 0.268941]
    # BRAIn: -[(0.5 - 0.731059) * -1 + (0.5 - 0.268941) * -2] = -(0.231059 - 0.462117) = 0.231059
    # SNIS-DPG: -[0.5 * -1 + 0.5 * -2] = 1.5
    policy_logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    target_logps, proposal_logps = torch.zeros(1, 2), torch.full((1, 2), -1.0)
    loss, metrics = brain_loss(policy_logps, target_logps, proposal_logps)
    expected = -((0.5 - sigmoid(1)) * -1 + (0.5 - sigmoid(-1)) * -2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["alpha_ess"].item() == pytest.approx(2.0)
    assert metrics["alpha_beta_tvd"].item() == pytest.approx(sigmoid(1) - 0.5, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, [policy_logps])  # weights are detached
    torch.testing.assert_close(grad, -torch.tensor([[0.5 - sigmoid(1), 0.5 - sigmoid(-1)]]))
    loss, _ = snis_dpg_loss(policy_logps, target_logps, proposal_logps)
    assert loss.item() == pytest.approx(1.5)


def test_brain_with_two_samples_and_one_hot_alpha_is_dpo_at_beta_one():
    # q = p_sft, n = 2, alpha one-hot on the higher reward: grad = DPO grad at beta = 1.
    generator = torch.Generator().manual_seed(2)
    batch = 5
    policy_logps = (-10 * torch.rand(batch, 2, generator=generator)).requires_grad_()
    sft_logps = -10 * torch.rand(batch, 2, generator=generator)
    winner = torch.randint(0, 2, (batch,), generator=generator)
    rewards = torch.where(
        torch.arange(2)[None, :] == winner[:, None], torch.tensor(1e4), torch.tensor(-1e4)
    )
    loss, _ = brain_loss(policy_logps, sft_logps + rewards, sft_logps)
    (brain_gradient,) = torch.autograd.grad(loss, [policy_logps])

    rows = torch.arange(batch)
    chosen = policy_logps.detach()[rows, winner].requires_grad_()
    rejected = policy_logps.detach()[rows, 1 - winner].requires_grad_()
    dpo, _ = dpo_loss(chosen, rejected, sft_logps[rows, winner], sft_logps[rows, 1 - winner], 1.0)
    chosen_grad, rejected_grad = torch.autograd.grad(dpo, [chosen, rejected])
    torch.testing.assert_close(brain_gradient[rows, winner], chosen_grad)
    torch.testing.assert_close(brain_gradient[rows, 1 - winner], rejected_grad)


def test_brain_and_snis_with_enumerated_uniform_samples_give_exact_kl_gradient():
    # Every outcome drawn once from a uniform q: alpha^ = p and beta^ = pi exactly, so
    # grad = -sum p grad log pi + sum grad pi = grad KL(p || pi) (and the same for SNIS).
    theta = toy_policy(3)
    policy_logps = torch.log_softmax(theta, 0)[None, :]  # (1, 3)
    uniform = torch.full((1, 3), math.log(1 / 3))
    (kl_gradient,) = torch.autograd.grad(
        exact_forward_kl(TARGET_LOGPS, torch.log_softmax(theta, 0)), [theta]
    )
    for loss_fn in (brain_loss, snis_dpg_loss):
        loss, _ = loss_fn(policy_logps, TARGET_LOGPS[None, :], uniform)
        (gradient,) = torch.autograd.grad(loss, [theta], retain_graph=True)
        torch.testing.assert_close(gradient, kl_gradient)


# ----------------------------------------------------------------------------- moment matching


def test_moment_matching_steps_by_hand():
    # phi = [0, 1], lambda = 0: w = [0.5, 0.5], mu^ = 0.5; lambda = 0 + 0.5 (0.8 - 0.5) = 0.15
    # then w_1 = sigmoid(0.15) = 0.537430; lambda = 0.15 + 0.5 (0.8 - 0.537430) = 0.281285
    features, target = torch.tensor([[0.0], [1.0]]), torch.tensor([0.8])
    lambdas, metrics = moment_matching_step(features, torch.zeros(1), target, learning_rate=0.5)
    assert lambdas.item() == pytest.approx(0.15, abs=1e-7)
    assert metrics["moment_error"].item() == pytest.approx(0.3, abs=1e-7)
    lambdas, _ = moment_matching_step(features, lambdas, target, learning_rate=0.5)
    assert lambdas.item() == pytest.approx(0.15 + 0.5 * (0.8 - sigmoid(0.15)), abs=1e-7)


def test_fit_moment_matching_recovers_exact_lambdas():
    # a uniform over 4 outcomes with two binary features; p ∝ exp(l . phi) factorises, so
    # E_p[phi_k] = sigmoid(l_k): the solution is l = logit([0.7, 0.4]) = [0.847298, -0.405465]
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lambdas, metrics = fit_moment_matching(features, torch.tensor([0.7, 0.4]), tolerance=1e-5)
    assert metrics["converged"].item() == 1.0
    expected = torch.tensor([math.log(0.7 / 0.3), math.log(0.4 / 0.6)])
    torch.testing.assert_close(lambdas, expected, atol=1e-4, rtol=0)
