"""Policy-gradient pieces against hand-worked numbers and reference recursions."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.policy import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    kl_penalized_scores,
    masked_mean,
    masked_whiten,
    penalize_missing_eos,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
    reinforce_loss,
    reinforce_pp_advantages,
    reward_to_go,
    rloo_advantages,
)


def random_mask(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    """Right-padded rows of random length >= 1, one left-padded row and one with a gap."""
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    mask[0] = 0.0
    mask[0, length // 2 :] = 1.0  # left padding
    mask[1] = 1.0
    mask[1, 2:4] = 0.0  # a gap
    return mask


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    # log r = log pi_ref - log pi = -1.5 - -1.0 = -0.5
    # k1 = 0.5; k2 = 0.25 / 2 = 0.125; k3 = e^-0.5 - 1 + 0.5 = 0.106531
    logps, ref_logps = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    assert kl_estimate(logps, ref_logps, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logps, ref_logps, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logps, ref_logps, "k3").item() == pytest.approx(math.exp(-0.5) - 0.5)
    # clamp: log r = -20 - 0 clamped to -10 -> k1 = 10
    clamped = kl_estimate(torch.tensor([[0.0]]), torch.tensor([[-20.0]]), "k1", log_ratio_clamp=10)
    assert clamped.item() == pytest.approx(10.0)
    with pytest.raises(ValueError):
        kl_estimate(logps, ref_logps, "k4")


def test_k1_and_k3_are_unbiased_by_exact_expectation():
    # Sum over every outcome x of pi(x) k(x): k1 and k3 give KL(pi || ref) exactly.
    generator = torch.Generator().manual_seed(0)
    logps = torch.log_softmax(torch.randn(6, generator=generator), 0)
    ref_logps = torch.log_softmax(torch.randn(6, generator=generator), 0)
    exact_kl = (logps.exp() * (logps - ref_logps)).sum()
    for estimator in ("k1", "k3"):
        estimate = (logps.exp() * kl_estimate(logps, ref_logps, estimator)).sum()
        torch.testing.assert_close(estimate, exact_kl)
    assert (kl_estimate(logps, ref_logps, "k3") >= 0).all()


# ----------------------------------------------------------------------------- rewards


def test_missing_eos_penalty():
    scores, contains_eos = torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    replaced = penalize_missing_eos(scores, contains_eos, penalty=-1.0, mode="replace")
    subtracted = penalize_missing_eos(scores, contains_eos, penalty=1.0, mode="subtract")
    assert replaced.tolist() == [1.0, -1.0]
    assert subtracted.tolist() == [1.0, 1.0]


def test_ppo_token_rewards_by_hand():
    # r_t = -0.5 KL_t, score added at the last valid token, zero on padding
    # row 0: [-0.05, -0.1, 0.05 + 1, 0]; row 1: [-0.15, -0 + 2, 0, 0]
    token_kl = torch.tensor([[0.1, 0.2, -0.1, 5.0], [0.3, 0.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, metrics = ppo_token_rewards(torch.tensor([1.0, 2.0]), token_kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, 1.05, 0.0], [-0.15, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # sequence KL sums [0.2, 0.3], mean 0.25
    assert metrics["kl"].item() == pytest.approx(0.25)
    assert metrics["non_score_reward"].item() == pytest.approx(-0.125)
    # REINFORCE / RLOO reward R = s - 0.5 * sum KL = [1 - 0.1, 2 - 0.15]
    penalized = kl_penalized_scores(torch.tensor([1.0, 2.0]), token_kl, mask, kl_coef=0.5)
    torch.testing.assert_close(penalized, torch.tensor([0.9, 1.85]))


# ----------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    # r = [0, 0, 1], V = [0.5, 0.4, 0.3], gamma = 1, lambda = 0.5
    # t=2: delta = 1 + 0 - 0.3 = 0.7;     A = 0.7
    # t=1: delta = 0 + 0.3 - 0.4 = -0.1;  A = -0.1 + 0.5 * 0.7 = 0.25
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1;  A = -0.1 + 0.5 * 0.25 = 0.025
    # returns = A + V = [0.525, 0.65, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.025, 0.25, 0.7, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.525, 0.65, 1.0, 0.0]]))


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain per-row recursion over the valid indices, with V = 0 after the last one."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        valid = [t for t in range(rewards.shape[1]) if mask[row, t]]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(valid):
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[row, t].item()
            advantages[row, t] = next_advantage
    return advantages, (advantages + values) * mask


def test_gae_matches_reference_recursion_on_random_masked_data():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(6, 9, generator=generator)
    values = torch.randn(6, 9, generator=generator)
    mask = random_mask(generator, 6, 9)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_gae_with_unit_gamma_lambda_gives_reward_to_go():
    # lambda = gamma = 1: A_t = sum_{u>=t} r_u - V_t (telescoping), so with V = 0 A is the
    # reward-to-go, and for any V the returns A + V are.
    generator = torch.Generator().manual_seed(2)
    rewards = torch.randn(5, 7, generator=generator)
    mask = torch.ones(5, 7)
    mask[2, 4:] = 0
    mask[3, 1:] = 0
    advantages, _ = gae(rewards, torch.zeros(5, 7), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, reward_to_go(rewards, mask))
    _, returns = gae(rewards, torch.randn(5, 7, generator=generator), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, reward_to_go(rewards, mask))
    # reward_to_go by hand: [1, 2, 3] -> [6, 5, 3]
    hand = reward_to_go(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(hand, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


# ----------------------------------------------------------------------------- whitening


def test_masked_whiten_gives_zero_mean_unit_std_over_mask():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(6, 9, generator=generator) * 4 + 3
    values[random_mask(generator, 6, 9) == 0] = 1000.0  # padding must not leak in
    mask = (values != 1000.0).float()
    whitened = masked_whiten(values, mask)
    valid = whitened[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    assert (whitened[~mask.bool()] == 0).all()
    kept_mean = masked_whiten(values, mask, shift_mean=False)[mask.bool()]
    assert kept_mean.mean().item() == pytest.approx(values[mask.bool()].mean().item(), abs=1e-4)
    assert kept_mean.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # by hand: [1, 2, 3] -> mean 2, population var 2/3 -> [-1, 0, 1] / sqrt(2/3)
    hand = masked_whiten(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3))
    scale = 1 / math.sqrt(2 / 3)
    torch.testing.assert_close(hand, torch.tensor([[-scale, 0.0, scale]]))


# ----------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    generator = torch.Generator().manual_seed(4)
    old_logps = -torch.rand(4, 6, generator=generator)
    advantages = torch.randn(4, 6, generator=generator)
    mask = random_mask(generator, 4, 6)
    loss, metrics = ppo_policy_loss(old_logps.clone(), old_logps, advantages, mask)
    torch.testing.assert_close(loss, -masked_mean(advantages, mask))
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_ppo_policy_loss_clipping_by_hand():
    # eps = 0.2; per token -> max(-A r, -A clip(r, 0.8, 1.2))
    # A= 1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    # A= 1, r=0.5: max(-0.5, -0.8) = -0.5
    # A=-1, r=1.5: max( 1.5,  1.2) =  1.5
    # A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    # mean = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; clip fraction 2/4
    # d/dlp of -A r on unclipped tokens is -A r / 4: [0, -0.125, 0.375, 0]
    old_logps = torch.full((1, 5), -1.0, requires_grad=True)
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 3.0]])
    logps = (old_logps.detach() + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = ppo_policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    logps_grad, old_grad = torch.autograd.grad(loss, [logps, old_logps], allow_unused=True)
    torch.testing.assert_close(logps_grad, torch.tensor([[0.0, -0.125, 0.375, 0.0, 0.0]]))
    assert old_grad is None


def test_ppo_value_loss_by_hand():
    # token 0: V=1, V_old=0.5, R=2: V_clip = 0.5 + 0.2 = 0.7; max(1, 1.69) = 1.69 (clipped)
    # token 1: V=0, V_old=0.1, R=0: V_clip = 0.1 - 0.1 = 0.0; max(0, 0) = 0
    # L = 0.5 * (1.69 + 0) / 2 = 0.4225
    values = torch.tensor([[1.0, 0.0, 5.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.1, 0.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.4225, abs=1e-6)
    assert metrics["value_clip_fraction"].item() == pytest.approx(0.5)
    # the clipped branch is active on token 0 -> no gradient to V there
    values_grad, old_grad = torch.autograd.grad(loss, [values, old_values], allow_unused=True)
    assert values_grad[0, 0].item() == 0.0
    assert old_grad is None


def test_ppo_value_clip_fraction_counts_no_rounding_inside_the_range():
    # |V - V_old| = 0.0117 < 0.2: not clipped. In fp32 V_old + (V - V_old) is not V here
    # (-0.0047369976528 for V = -0.0047369971871), so the clipped error would come out one
    # rounding larger than the unclipped one and count as a clipped token.
    values = torch.tensor([[-0.004736997187137604, 1.0]], requires_grad=True)
    old_values = torch.tensor([[0.006920091342180967, 0.5]])
    returns = torch.tensor([[0.0, 2.0]])
    mask = torch.tensor([[1, 1]])
    assert (old_values + (values - old_values))[0, 0] != values[0, 0]  # the rounding
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # token 0: unclipped, error V^2; token 1: V_clip = 0.7, error 1.69 (clipped)
    v = values[0, 0].item()
    assert loss.item() == pytest.approx(0.5 * (v * v + 1.69) / 2, abs=1e-7)
    assert metrics["value_clip_fraction"].item() == 0.5  # token 1 only
    (values_grad,) = torch.autograd.grad(loss, [values])
    assert values_grad[0, 0].item() == pytest.approx(0.5 * v, rel=1e-5)  # d/dV 0.5 V^2 / 2
    assert values_grad[0, 1].item() == 0.0


# ----------------------------------------------------------------------------- critic-free


def test_rloo_advantages_by_hand_and_identity():
    # R = [1, 2, 6]: A_0 = 1 - (2+6)/2 = -3, A_1 = 2 - (1+6)/2 = -1.5, A_2 = 6 - (1+2)/2 = 4.5
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([[1.0, 2.0, 6.0]])), torch.tensor([[-3.0, -1.5, 4.5]])
    )
    generator = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 5, generator=generator)
    expected = 5 / 4 * (rewards - rewards.mean(1, keepdim=True))
    torch.testing.assert_close(rloo_advantages(rewards), expected)
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(3, 1))


def test_grpo_advantages_by_hand():
    # s = [1, 2, 3]: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-4)
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    advantages = grpo_advantages(scores, eps=1e-4)
    torch.testing.assert_close(advantages[0], torch.tensor([-1.0, 0.0, 1.0]) / 1.0001)
    assert (advantages[1] == 0).all()  # zero-variance group
    torch.testing.assert_close(
        grpo_advantages(scores, scale_by_std=False)[0], torch.tensor([-1.0, 0.0, 1.0])
    )


def test_grpo_loss_aggregations_by_hand():
    # ratio 1 and pi = pi_ref -> l_t = -A. Sequence 0: 2 tokens, A = 1; sequence 1: 4 tokens, A = -1
    # GRPO:    mean_i mean_t l = ((-1) + (+1)) / 2 = 0
    # Dr.GRPO: sum l / (N L_max) = (2 * -1 + 4 * 1) / (2 * 4) = 0.25; with L_max = 8: 2 / 16
    logps = torch.full((2, 4), -1.0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    common = dict(old_logps=logps, ref_logps=logps, advantages=advantages, mask=mask)
    loss, metrics = grpo_loss(logps, **common, aggregation="sequence_mean")
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["clip_fraction"].item() == 0.0
    loss, _ = grpo_loss(logps, **common, aggregation="constant")
    assert loss.item() == pytest.approx(0.25, abs=1e-7)
    loss, _ = grpo_loss(logps, **common, aggregation="constant", max_completion_length=8)
    assert loss.item() == pytest.approx(0.125, abs=1e-7)


def test_grpo_kl_term_and_clipping_by_hand():
    # A = 0, log(pi_ref/pi) = -1.5 - -1 = -0.5: k3 = e^-0.5 + 0.5 - 1 = 0.106531
    # loss = 0.04 * 0.106531 = 0.0042612; d/dlp = 0.04 * (1 - e^-0.5) = 0.0157388
    logps = torch.tensor([[-1.0]], requires_grad=True)
    old_logps = torch.tensor([[-1.0]], requires_grad=True)
    ref_logps = torch.tensor([[-1.5]], requires_grad=True)
    loss, metrics = grpo_loss(
        logps, old_logps, ref_logps, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.04
    )
    assert loss.item() == pytest.approx(0.04 * (math.exp(-0.5) - 0.5), abs=1e-7)
    assert metrics["kl"].item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)
    grads = torch.autograd.grad(loss, [logps, old_logps, ref_logps], allow_unused=True)
    assert grads[0].item() == pytest.approx(0.04 * (1 - math.exp(-0.5)), abs=1e-7)
    assert grads[1] is None and grads[2] is None
    # A = 1, ratio 1.5 > 1.2: -min(1.5, 1.2) = -1.2, clipped
    loss, metrics = grpo_loss(
        torch.tensor([[math.log(1.5)]]),
        torch.zeros(1, 1),
        None,
        torch.tensor([1.0]),
        torch.ones(1, 1),
        kl_coef=0.0,
    )
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert metrics["clip_fraction"].item() == 1.0


def test_reinforce_pp_advantages_by_hand():
    # no group: KL row 0 = [0.2, 0], kl_coef 1 -> rewards [-0.2, 0 + 1], row 1 [3] (1 token)
    # reward-to-go: [0.8, 1.0], [3.0]; valid values [0.8, 1, 3]: mean 1.6,
    # deviations [-0.8, -0.6, 1.4], population var 2.96 / 3, std 0.993311
    token_kl = torch.tensor([[0.2, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, _ = reinforce_pp_advantages(torch.tensor([1.0, 3.0]), token_kl, mask, kl_coef=1.0)
    std = math.sqrt(2.96 / 3)
    expected = torch.tensor([[-0.8 / std, -0.6 / std], [1.4 / std, 0.0]])
    torch.testing.assert_close(advantages, expected)
    # group baseline, size 2: [1, 3, 10, 14] -> [-1, 1, -2, 2]; mean 0, var 10 / 4 = 2.5
    advantages, _ = reinforce_pp_advantages(
        torch.tensor([1.0, 3.0, 10.0, 14.0]),
        torch.zeros(4, 1),
        torch.ones(4, 1),
        kl_coef=0.1,
        group_size=2,
    )
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-1.0, 1.0, -2.0, 2.0]) / 2.5**0.5)


def test_reinforce_loss_by_hand():
    # S = [-2, -3], A = [1, -0.5]: L = -mean(-2, 1.5) = 0.25; dL/dS = -A / 2 = [-0.5, 0.25]
    sequence_logps = torch.tensor([-2.0, -3.0], requires_grad=True)
    advantages = torch.tensor([1.0, -0.5], requires_grad=True)
    loss, _ = reinforce_loss(sequence_logps, advantages)
    assert loss.item() == pytest.approx(0.25)
    logps_grad, advantages_grad = torch.autograd.grad(
        loss, [sequence_logps, advantages], allow_unused=True
    )
    torch.testing.assert_close(logps_grad, torch.tensor([-0.5, 0.25]))
    assert advantages_grad is None


# ----------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_by_hand_and_state_round_trip():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: e = clip(9/6 - 1 = 0.5, -0.2, 0.2) = 0.2; beta = 0.2 (1 + 0.2 * 256 / 10000) = 0.201024
    assert controller.update(9.0, 256) == pytest.approx(0.201024, abs=1e-12)
    # KL 5.4: e = 0.9 - 1 = -0.1; beta = 0.201024 (1 - 0.1 * 100 / 10000) = 0.200822976
    assert controller.update(5.4, 100) == pytest.approx(0.200822976, abs=1e-12)
    restored = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    assert restored.update(3.0, 64) == controller.update(3.0, 64)


def test_fixed_kl_controller():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 256) == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05
