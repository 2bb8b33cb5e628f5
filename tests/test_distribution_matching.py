"""Distribution matching: an exact toy where p* is enumerated, then the ``alignkit dm`` recipe.

Toy: X = 2 prompts, sequences of L = 3 tokens over V = 4, a tabular autoregressive policy
(one logit vector per prompt and prefix), so all 64 sequences of a prompt are enumerated and
p*(y|x) ∝ pi_ref(y|x) exp(r(x, y)/beta) and both KLs are exact.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from alignkit.recipes.distribution import (
    PartitionEstimates,
    ProposalSchedule,
    distribution_matching_loss,
    forward_kls,
)

from .online_helpers import TINY_ONLINE, metrics, run_cli, without_timing

VOCAB, LENGTH, PROMPTS, BETA = 4, 3, 2, 0.5
SEQUENCES = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # (64, L)
NUM_CONTEXTS = (VOCAB**LENGTH - 1) // (VOCAB - 1)  # 21 prefixes of length 0..L-1


def _context_ids() -> torch.Tensor:  # (64, L): which prefix predicts token t
    columns = []
    for t in range(LENGTH):
        offset = (VOCAB**t - 1) // (VOCAB - 1)
        prefix = torch.zeros(len(SEQUENCES), dtype=torch.long)
        for j in range(t):
            prefix = prefix * VOCAB + SEQUENCES[:, j]
        columns.append(offset + prefix)
    return torch.stack(columns, 1)


CONTEXTS = _context_ids()


class TabularPolicy(nn.Module):
    """pi(y | x) = prod_t softmax(logits[x, prefix(y_<t)])[y_t]."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())  # (X, C, V)

    def forward(self) -> torch.Tensor:  # (X, 64) log pi(y | x) of every sequence
        token_logps = torch.log_softmax(self.logits, -1)[:, CONTEXTS]  # (X, 64, L, V)
        picked = token_logps.gather(-1, SEQUENCES[None, :, :, None].expand(PROMPTS, -1, -1, 1))
        return picked.squeeze(-1).sum(-1)


def reference_logits(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(PROMPTS, NUM_CONTEXTS, VOCAB, generator=generator)


REWARDS = torch.stack([(SEQUENCES == x).sum(-1).float() for x in range(PROMPTS)])  # (X, 64)


def target_logps(reference: torch.Tensor) -> torch.Tensor:  # (X, 64) log P = log pi_ref + r/beta
    return reference + REWARDS / BETA


def exact_kls(policy_logps: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(KL(p* || pi), KL(pi || p*)) averaged over prompts, by enumeration."""
    log_p = torch.log_softmax(target, -1)
    forward = (log_p.exp() * (log_p - policy_logps)).sum(-1).mean()
    reverse = (policy_logps.exp() * (policy_logps - log_p)).sum(-1).mean()
    return float(forward), float(reverse)


def sample(logps: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:  # (X, n)
    return torch.multinomial(logps.exp(), n, replacement=True, generator=generator)


@pytest.mark.parametrize("algo", ["dpg", "gdcpp", "brain", "snis"])
def test_expected_gradient_matches_exact_forward_kl_gradient(algo):
    # q = pi_ref, pi_theta = another random table; 200 batches of 1024 samples per prompt.
    reference = TabularPolicy(reference_logits(0))().detach()
    policy = TabularPolicy(reference_logits(1))
    target = target_logps(reference)
    log_partition = torch.logsumexp(target, -1)  # (X,) exact
    policy_logps = policy()
    log_p = torch.log_softmax(target, -1)
    exact_kl = (log_p.exp() * (log_p - policy_logps)).sum(-1).mean()
    (exact,) = torch.autograd.grad(exact_kl, [policy.logits], retain_graph=True)

    generator = torch.Generator().manual_seed(0)
    gradients = []
    for _ in range(200):
        index = sample(reference, 1024, generator)
        loss, _ = distribution_matching_loss(
            algo,
            policy_logps.gather(1, index),
            target.gather(1, index),
            reference.gather(1, index),
            log_partition,
        )
        (gradient,) = torch.autograd.grad(loss, [policy.logits], retain_graph=True)
        gradients.append(gradient.flatten())
    gradients = torch.stack(gradients).double()
    mean = gradients.mean(0)
    standard_error = gradients.std(0) / math.sqrt(len(gradients))
    z = (mean - exact.flatten().double()) / standard_error.clamp(min=1e-12)
    assert z.abs().max() < 5.0, (algo, z.abs().max())
    relative = (mean - exact.flatten()).norm() / exact.norm()
    assert relative < 0.05, (algo, relative)


def train_toy(algo: str, proposal: str, steps: int = 300, n: int = 32) -> dict[str, float]:
    """Fit the tabular policy to p* from its own (or an adaptive proposal's) samples."""
    torch.manual_seed(0)
    reference = TabularPolicy(reference_logits(0))().detach()
    target = target_logps(reference)
    policy = TabularPolicy(reference_logits(0))
    proposal_logits = policy.logits.detach().clone()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    partitions, schedule = PartitionEstimates(), ProposalSchedule(interval=10)
    generator = torch.Generator().manual_seed(1)
    start = exact_kls(reference, target)
    for _ in range(steps):
        policy_all = policy()
        if proposal == "policy":
            proposal_all = policy_all.detach()
        else:
            proposal_all = TabularPolicy(proposal_logits)().detach()
        index = sample(proposal_all, n, generator)  # 1. sample from q
        policy_logps = policy_all.gather(1, index)  # 2. score
        batch_target, batch_proposal = target.gather(1, index), proposal_all.gather(1, index)
        log_partition = partitions.update(list(range(PROMPTS)), batch_target, batch_proposal)
        loss, _ = distribution_matching_loss(  # 3. update
            algo, policy_logps, batch_target, batch_proposal, log_partition
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if proposal == "adaptive":  # 4. q <- pi when KL(p*||pi) < KL(p*||q)
            kls = forward_kls(batch_target, batch_proposal, policy_logps.detach(), log_partition)
            if schedule.observe(*kls):
                proposal_logits = policy.logits.detach().clone()
    forward, reverse = exact_kls(policy().detach(), target)
    return {
        "start_forward": start[0],
        "start_reverse": start[1],
        "forward": forward,
        "reverse": reverse,
        "proposal_updates": schedule.updates,
    }


@pytest.mark.parametrize(
    ("algo", "proposal"),
    [("dpg", "policy"), ("dpg", "adaptive"), ("brain", "policy"), ("gdcpp", "policy")],
)
def test_training_drives_both_kls_far_below_start(algo, proposal):
    result = train_toy(algo, proposal)
    assert result["start_forward"] > 0.5 and result["start_reverse"] > 0.5, result
    assert result["forward"] < 0.2 * result["start_forward"], result
    assert result["reverse"] < 0.2 * result["start_reverse"], result
    if proposal == "adaptive":
        assert result["proposal_updates"] >= 3, result


def test_toy_training_is_deterministic():
    assert train_toy("brain", "policy", steps=20) == train_toy("brain", "policy", steps=20)


def test_partition_estimates_state_round_trip():
    estimates = PartitionEstimates()
    estimates.update([3, 7], torch.zeros(2, 4), torch.full((2, 4), -math.log(2)))
    copy = PartitionEstimates()
    copy.load_state_dict(json.loads(json.dumps(estimates.state_dict())))
    assert copy.log_partition == {3: pytest.approx(math.log(2)), 7: pytest.approx(math.log(2))}
    assert copy.samples_seen == {3: 4, 7: 4}


# ----------------------------------------------------------------------------- the recipe


def test_dm_recipe_raises_the_toy_reward(tiny_model, tmp_path, capsys):
    out = tmp_path / "dm"
    args = ["dm", f"model={tiny_model}", f"output_dir={out}", *TINY_ONLINE]
    args += ["algo=dpg", "max_steps=4", "samples_per_prompt=8", "kl_coef=0.05"]
    args += ["updates_per_batch=4", "lr=2e-2", "bf16=false"]  # fp32: see test_online_dpo
    code, err = run_cli(args, capsys)
    assert code == 0, err
    rows = metrics(out)
    for row in rows[1:]:
        assert math.isfinite(row["loss"]) and 0 < row["ess_fraction"] <= 1
        assert math.isfinite(row["log_partition"]) and "gold" in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/reward"] > summary["reference_reward"] + 0.3, summary


def test_dm_brain_adaptive_proposal_same_seed_resume_and_bad_input(tiny_model, tmp_path, capsys):
    base = ["dm", f"model={tiny_model}", *TINY_ONLINE, "max_steps=2", "eval_prompts=2"]
    base += ["algo=brain", "proposal=adaptive", "proposal_update_every=1", "samples_per_prompt=3"]
    base += ["lr=1e-2", "save_steps=1"]
    for name in ("a", "b"):
        code, err = run_cli([*base, f"output_dir={tmp_path / name}"], capsys)
        assert code == 0, err
    rows = metrics(tmp_path / "a")
    assert without_timing(rows) == without_timing(metrics(tmp_path / "b"))
    assert {"alpha_ess", "beta_ess", "alpha_beta_tvd", "kl_target_proposal"} <= set(rows[1])
    assert rows[-1]["proposal_updates"] in (0.0, 1.0, 2.0)
    # --resume from the step-1 checkpoint (policy, proposal, Z estimates) redoes step 2 exactly
    code, err = run_cli([*base, "--resume", f"output_dir={tmp_path / 'a'}"], capsys)
    assert code == 0, err
    assert without_timing(metrics(tmp_path / "a")) == without_timing(rows)
    code, err = run_cli([*base, "algo=ppo", f"output_dir={tmp_path / 'c'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "algo" in err
