"""Distribution matching (DPG, GDC++, BRAIn): fit p*(y|x) ∝ pi_ref(y|x) exp(r(x,y)/beta).

The target is the KL-regularised RL optimum (Korbak et al., arXiv 2205.11275), fitted by
forward KL(p* || pi_theta) from samples of a proposal q: the policy itself, or GDC's
KL-adaptive proposal, a frozen copy of the policy replaced whenever the policy is closer to
p* than it (Khalifa et al., arXiv 2012.11635). Estimators (``alignkit.losses.distribution``):

- ``dpg``   Parshakova et al., arXiv 1912.08517: weights P/q;
- ``gdcpp`` Korbak et al., arXiv 2206.00761: DPG with the baseline Z pi/q;
- ``brain`` Pandey et al., arXiv 2402.02479: per-prompt softmax over the n samples of
  log P - log q, with the self-normalised baseline softmax(log pi - log q);
- ``snis``  BRAIn without the baseline.

DPG and GDC++ divide P by a running per-prompt estimate of Z(x) (as CDPG does per context),
so every algorithm's expected gradient is the mean over prompts of grad KL(p*_x || pi_x)
and one learning rate serves all four.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignkit.config import check, doc
from alignkit.losses.distribution import (
    brain_loss,
    dpg_loss,
    forward_kl_estimate,
    gdc_pp_loss,
    snis_dpg_loss,
    update_log_partition,
)
from alignkit.models import hold_bf16
from alignkit.recipes.best_of_n import sequence_logps
from alignkit.recipes.online import OnlineConfig
from alignkit.recipes.online_run import OnlineRun
from alignkit.recipes.policy_gradient import optimizer_update
from alignkit.rollout import Rollout, score
from alignkit.training.optim import check_finite

Algo = Literal["dpg", "gdcpp", "brain", "snis"]
ALGOS: tuple[str, ...] = ("dpg", "gdcpp", "brain", "snis")
Metrics = dict[str, torch.Tensor]


def distribution_matching_loss(
    algo: str,
    policy_logps: torch.Tensor,  # (B, n) S_theta(y_i | x), y_i ~ q(. | x)
    target_logps: torch.Tensor,  # (B, n) log P(x, y_i) = S_ref(y_i | x) + r(x, y_i) / beta
    proposal_logps: torch.Tensor,  # (B, n) log q(y_i | x)
    log_partition: torch.Tensor,  # (B,) log Z(x) estimate (used by dpg and gdcpp)
) -> tuple[torch.Tensor, Metrics]:
    """One estimator of grad mean_x KL(p*_x || pi_x), chosen by ``algo``.

    dpg:   L = -mean_{x,i} [P/(Z q)](y_i) S_theta(y_i)
    gdcpp: L = -mean_{x,i} [P/(Z q) - pi/q](y_i) S_theta(y_i)
    brain: L = -mean_x sum_i (softmax_i(log P - log q) - softmax_i(S_theta - log q)) S_theta(y_i)
    snis:  L = -mean_x sum_i softmax_i(log P - log q) S_theta(y_i)
    """
    normalised_target = target_logps.float() - log_partition.float()[:, None]
    if algo == "dpg":
        return dpg_loss(
            policy_logps.flatten(), normalised_target.flatten(), proposal_logps.flatten()
        )
    if algo == "gdcpp":
        return gdc_pp_loss(
            policy_logps.flatten(), normalised_target.flatten(), proposal_logps.flatten(), 0.0
        )
    if algo == "brain":
        return brain_loss(policy_logps, target_logps, proposal_logps)
    if algo == "snis":
        return snis_dpg_loss(policy_logps, target_logps, proposal_logps)
    raise ValueError(f"unknown distribution-matching algorithm {algo!r} (known: {ALGOS})")


class PartitionEstimates:
    """Running importance-sampling estimates of log Z(x) = log E_q[P/q], one per prompt.

    Each prompt's estimate is the mean of P/q over every sample of that prompt seen so far
    (:func:`alignkit.losses.distribution.update_log_partition`); it stays unbiased when q
    changes, because every q-sample's weight P/q has expectation Z(x).
    """

    def __init__(self) -> None:
        self.log_partition: dict[int, float] = {}
        self.samples_seen: dict[int, int] = {}

    def update(
        self,
        prompt_keys: list[int],  # B prompt identifiers
        target_logps: torch.Tensor,  # (B, n)
        proposal_logps: torch.Tensor,  # (B, n)
    ) -> torch.Tensor:  # (B,) log Z(x) after folding in this batch
        """Fold the batch in and return the current log Z(x) of its prompts."""
        out = []
        for row, key in enumerate(prompt_keys):
            log_z, seen = update_log_partition(
                target_logps[row],
                proposal_logps[row],
                self.log_partition.get(key),
                self.samples_seen.get(key, 0),
            )
            self.log_partition[key], self.samples_seen[key] = log_z, seen
            out.append(log_z)
        return torch.tensor(out, dtype=torch.float32, device=target_logps.device)

    def state_dict(self) -> dict[str, dict[int, float] | dict[int, int]]:
        return {"log_partition": dict(self.log_partition), "samples_seen": dict(self.samples_seen)}

    def load_state_dict(self, state: dict) -> None:
        self.log_partition = {int(k): float(v) for k, v in state["log_partition"].items()}
        self.samples_seen = {int(k): int(v) for k, v in state["samples_seen"].items()}


def forward_kls(
    target_logps: torch.Tensor,  # (B, n)
    proposal_logps: torch.Tensor,  # (B, n)
    policy_logps: torch.Tensor,  # (B, n)
    log_partition: torch.Tensor,  # (B,)
) -> tuple[float, float]:
    """(KL(p* || pi_theta), KL(p* || q)), importance-sampled per prompt, mean over prompts."""
    kl_policy, kl_proposal = [], []
    for row in range(target_logps.shape[0]):
        args = (target_logps[row], proposal_logps[row])
        kl_policy.append(forward_kl_estimate(*args, policy_logps[row], log_partition[row]))
        kl_proposal.append(forward_kl_estimate(*args, proposal_logps[row], log_partition[row]))
    return float(torch.stack(kl_policy).mean()), float(torch.stack(kl_proposal).mean())


class ProposalSchedule:
    """GDC's KL-adaptive proposal: accumulate KL(p*||pi) and KL(p*||q) over ``interval``
    steps, then replace q by pi_theta when pi_theta is the closer of the two.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.kl_policy: list[float] = []
        self.kl_proposal: list[float] = []
        self.updates = 0

    def observe(self, kl_policy: float, kl_proposal: float) -> bool:
        """Record one step's estimates; True when q should now become a copy of pi_theta."""
        self.kl_policy.append(kl_policy)
        self.kl_proposal.append(kl_proposal)
        if len(self.kl_policy) < self.interval:
            return False
        policy_mean = sum(self.kl_policy) / len(self.kl_policy)
        proposal_mean = sum(self.kl_proposal) / len(self.kl_proposal)
        self.kl_policy, self.kl_proposal = [], []
        replace = math.isfinite(policy_mean) and policy_mean < proposal_mean
        self.updates += int(replace)
        return replace

    def state_dict(self) -> dict[str, Any]:
        return {
            "kl_policy": list(self.kl_policy),
            "kl_proposal": list(self.kl_proposal),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_policy, self.kl_proposal = list(state["kl_policy"]), list(state["kl_proposal"])
        self.updates = int(state["updates"])


class ProposalWeights:
    """Checkpoint state of the adaptive proposal: its weights, restored after the policy loads."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.pending: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pending = state

    def build(self, policy: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of ``policy`` (or of the checkpointed proposal when resuming)."""
        self.model = copy.deepcopy(policy)
        if self.pending is not None:
            self.model.load_state_dict(self.pending)
            self.pending = None
        self.model.requires_grad_(False)
        self.model.eval()
        return self.model


# ---------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------


@dataclass
class Config(OnlineConfig):
    output_dir: str = doc("run directory", "runs/dm")
    algo: Algo = doc("dpg | gdcpp | brain | snis", "brain")
    kl_coef: float = doc("beta of the target p* ∝ pi_ref exp(r / beta)", 0.1)
    samples_per_prompt: int = doc("n: samples per prompt (BRAIn normalises over them)", 8)
    temperature: float = doc("sampling temperature of the proposal (p* and pi use 1)", 1.0)
    proposal: Literal["policy", "adaptive"] = doc(
        "policy: sample from pi_theta; adaptive: a frozen copy replaced when closer to p* (GDC)",
        "policy",
    )
    proposal_update_every: int = doc("steps between the adaptive proposal's KL comparisons", 4)
    updates_per_batch: int = doc(
        "optimizer steps on each sampled batch (after the first, q is the sampling policy: "
        "off-policy, importance-weighted)",
        1,
    )
    lr: float = doc("peak learning rate (AdamW)", 1e-5)

    def validate(self) -> None:
        super().validate()
        check(self.kl_coef > 0, "kl_coef", f"must be > 0 (the target's beta), got {self.kl_coef}")
        check(self.proposal_update_every >= 1, "proposal_update_every", "must be >= 1")
        check(self.updates_per_batch >= 1, "updates_per_batch", "must be >= 1")
        if self.algo in ("brain", "snis"):
            check(
                self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 for " + self.algo
            )


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    partitions, schedule = PartitionEstimates(), ProposalSchedule(config.proposal_update_every)
    states: dict[str, Any] = {"partitions": partitions, "proposal_schedule": schedule}
    proposal_weights = ProposalWeights()
    if config.proposal == "adaptive":
        states["proposal"] = proposal_weights
    session = OnlineRun.start(
        config,
        lambda policy: policy,
        overwrite=overwrite,
        resume=resume,
        desc=f"dm-{config.algo}",
        states=states,
    )
    # sampling and no-grad scoring use the plain policy (under fsdp a full copy of the
    # sharded one, refreshed every step); the update goes through session.forward
    policy, bf16 = session.rollout_policy, session.bf16
    params = [p for p in session.trainable.parameters() if p.requires_grad]
    proposal = policy
    if config.proposal == "adaptive":
        # scored beside the policy's bf16 copies, so in bf16 too (load_state_dict rounds)
        proposal = proposal_weights.build(policy)
        if session.bf16_weights:
            hold_bf16(proposal)
    n, beta, job = config.samples_per_prompt, config.kl_coef, session.job

    def estimator_loss(
        model: torch.nn.Module,
        rollout: Rollout,
        target: torch.Tensor,  # (B, n)
        proposal_sums: torch.Tensor,  # (B, n)
        log_partition: torch.Tensor,  # (B,)
    ) -> tuple:
        """(loss, metrics, S_theta of every sample (B, n) detached), with gradients."""
        mask = rollout.completion_mask
        policy_sums = (score(model, rollout, temperature=1.0, bf16=bf16).logps * mask).sum(-1)
        policy_sums = policy_sums.view(-1, n)
        loss, loss_metrics = distribution_matching_loss(
            config.algo, policy_sums, target, proposal_sums, log_partition
        )
        return loss, loss_metrics, policy_sums.detach()

    for step in range(session.start_step + 1, config.max_steps + 1):
        # 1. sample n completions per prompt from the proposal q (each rank its slice of
        # the prompts; the estimators are means over prompts, so each rank trains on its own)
        batch, first_row = session.local_prompts(step)
        with session.bf16_scope():
            samples = session.sample_and_score(proposal, step, batch, first_row, n)
            rollout, scores = samples.rollout, samples.scores
            mask = rollout.completion_mask
            # 2. score: the target log P = S_ref(y) + r / beta
            ref_sums = (session.reference.logps(rollout, bf16, 1.0) * mask).sum(-1)
            target = (ref_sums + scores / beta).view(-1, n)  # (B, n)
            # 3. log q(y) of the sampler at its temperature, and the running Z(x) (every rank
            # folds in the whole batch, so the estimates stay the same on all of them)
            proposal_sums = sequence_logps(proposal, rollout, bf16, config.temperature).view(-1, n)
        everything, whole = session.gather_samples(
            samples, {"target": target, "proposal": proposal_sums}
        )
        scores = everything.scores
        check_finite(float(scores.sum()), "reward", step, session.last_checkpoint)
        first = first_row // n if first_row is not None else 0
        here = slice(first, first + len(batch))  # this rank's prompts in the batch
        global_log_partition = partitions.update(
            session.sampler.indices(step), whole["target"], whole["proposal"]
        )
        log_partition = global_log_partition[here]
        # 4. the estimator's loss: updates_per_batch optimizer steps on this batch
        parts: list[dict[str, float]] = []
        for _ in range(config.updates_per_batch):
            with session.bf16_scope(update=True):
                loss, loss_metrics, policy_sums = session.forward(
                    estimator_loss, rollout, target, proposal_sums, log_partition
                )
                logged = loss.detach()
                all_policy_sums = torch.cat(job.gather(policy_sums))
                if job.enabled:
                    # the loss is a mean over prompts (or their rows): this rank's share of
                    # the prompts. The logged loss and statistics (ess_fraction, advantage_std
                    # are not means) are those of the whole batch, from every rank's S_theta
                    loss = loss * (len(batch) / config.prompts_per_step)
                    logged, loss_metrics = distribution_matching_loss(
                        config.algo,
                        all_policy_sums,
                        whole["target"],
                        whole["proposal"],
                        global_log_partition,
                    )
                part = {
                    "loss": float(logged),
                    "grad_norm": 0.0,  # set after the step
                    **{k: float(v) for k, v in loss_metrics.items()},
                }
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
            parts.append(part)
        session.scheduler.step()
        # 5. KL(p* || pi) and KL(p* || q); GDC's proposal update
        kl_policy, kl_proposal = forward_kls(
            whole["target"], whole["proposal"], all_policy_sums, global_log_partition
        )  # pi_theta as it was before the last update
        if config.proposal == "adaptive" and schedule.observe(kl_policy, kl_proposal):
            session.sync_plain()  # the policy after this step's updates
            proposal.load_state_dict(policy.state_dict())
        # 6. log, evaluate, checkpoint
        metrics: dict[str, float] = {
            "score": float(scores.mean()),
            **{k: sum(p[k] for p in parts) / len(parts) for k in parts[0]},
            "loss_first": parts[0]["loss"],
            "kl_target_policy": kl_policy,
            "kl_target_proposal": kl_proposal,
            "log_partition": float(global_log_partition.mean()),  # every prompt of the step
            "proposal_updates": float(schedule.updates),
            "response_length": float(everything.rollout.completion_lengths.float().mean()),
            "eos_fraction": float(everything.rollout.finished.float().mean()),
            "lr": session.optimizer.param_groups[0]["lr"],
        }
        if everything.gold is not None:
            metrics["gold"] = float(everything.gold.mean())
        session.end_of_step(step, metrics)
    return session.finish("max_steps")
