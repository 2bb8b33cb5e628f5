"""Set-up, per-step bookkeeping and wrap-up of an online run: what a recipe holds besides
its loop (inputs, models, optimizer, prompt order, metrics, evaluation, checkpoints)."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.data.examples import Prompt
from alignkit.models import bf16_compute, load_policy, load_tokenizer
from alignkit.recipes.best_of_n import ScoredSamples, sample_and_score
from alignkit.recipes.offline import save_run
from alignkit.recipes.online import (
    OnlineConfig,
    PromptSampler,
    ReferencePolicy,
    RewardFn,
    encode_prompts,
    evaluate_policy,
    load_prompts,
    rollout_seed,
    task_gold,
)
from alignkit.rollout import SamplingParams
from alignkit.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
)
from alignkit.training.common import (
    check_output_dir,
    prepare_output_dir,
    seed_everything,
    set_threads,
)
from alignkit.training.distributed import Distributed, LossModule, main_first, setup
from alignkit.training.fused import fused_layers
from alignkit.training.metrics import MetricsLogger
from alignkit.training.optim import build_optimizer


@dataclass
class RunInputs:
    """Everything a run reads, loaded and validated before any training compute."""

    tokenizer: Any
    train_prompts: list[Prompt]
    train_ids: list[list[int]]
    eval_prompts: list[Prompt]
    eval_ids: list[list[int]]
    reward_fn: RewardFn
    gold_fn: RewardFn | None


def load_run_inputs(config: OnlineConfig) -> RunInputs:
    """Tokenizer, prompts (encoded), reward and gold functions; raises :class:`InputError`."""
    from alignkit.rewards import build_reward

    tokenizer = load_tokenizer(config.model)
    train_prompts, eval_prompts = load_prompts(config.task, config.data)
    eval_prompts = eval_prompts[: config.eval_prompts]
    specs = [part.strip() for part in config.reward.split(",") if part.strip()]
    reward_fn = build_reward(
        specs, tokenizer=tokenizer, source="config", device=config.torch_device()
    )
    return RunInputs(
        tokenizer=tokenizer,
        train_prompts=train_prompts,
        train_ids=encode_prompts(tokenizer, train_prompts, config.max_prompt_length),
        eval_prompts=eval_prompts,
        eval_ids=encode_prompts(tokenizer, eval_prompts, config.max_prompt_length),
        reward_fn=reward_fn,
        gold_fn=task_gold(config.task, config.torch_device()),
    )


def evaluate(
    policy: nn.Module,
    inputs: RunInputs,
    params: SamplingParams,
    bf16: bool,
    reference: ReferencePolicy | None,
) -> dict[str, float]:
    """Held-out metrics with a fixed sampling seed (``eval/gold``, ``eval/reward``, ...)."""
    return evaluate_policy(
        policy,
        inputs.tokenizer,
        inputs.eval_prompts,
        inputs.eval_ids,
        params,
        bf16,
        reward_fn=inputs.reward_fn,
        gold_fn=inputs.gold_fn,
        reference=reference,
    )


# ---------------------------------------------------------------------------------------
# Run set-up, per-step bookkeeping, wrap-up
# ---------------------------------------------------------------------------------------


@dataclass
class OnlineRun:
    """What an online run holds besides its loop: models, optimizer, prompt order,
    metrics log, evaluation, checkpoints and the final save.

    ``states`` are recipe objects with ``state_dict`` / ``load_state_dict`` (a KL
    controller, running reward statistics) that checkpoints carry and resume restores.

    Under ``torchrun`` (``job`` with several ranks) each rank samples its slice of every
    step's prompts (:meth:`local_prompts`), and only rank 0 evaluates, logs and writes
    checkpoints and the final model (``logger`` is None on the other ranks).

    Everything with a gradient goes through :meth:`forward`; everything without one
    (sampling, rollout-time log-probs and values, evaluation, saving) uses ``plain``.
    With ``distributed=fsdp`` the trainable module is sharded (FSDP2, the loss module
    ``runner`` its root, so an update is one root forward and backward), and ``plain``
    is a full, unsharded copy of it, refreshed from the shards at the end of every step
    (:meth:`sync_plain`). Otherwise ``plain`` is the trainable module itself.

    With ``bf16_weights`` (bf16 in one process) a step computes as the offline training
    loop does: inside :meth:`bf16_scope` the trainable module holds bf16 copies of its
    fp32 weights (sampling, scoring, the update's forward and backward), and the
    separate frozen reference holds bf16 weights for good.
    """

    config: OnlineConfig
    started: float
    inputs: RunInputs
    policy: nn.Module  # the trained policy (under fsdp sharded: use it through forward)
    reference: ReferencePolicy
    trainable: nn.Module  # the policy, or a module holding the policy and its critic
    plain: nn.Module  # ``trainable``, or under fsdp its full copy for no-grad work
    rollout_policy: nn.Module  # the policy inside ``plain``: sampling, scoring, saving
    runner: nn.Module | None  # under fsdp: the sharded root whose forward runs an update
    optimizer: torch.optim.Optimizer
    scheduler: Any
    output_dir: Path
    start_step: int  # 0, or the step of the checkpoint a resumed run starts from
    step: int  # the last step logged
    last_checkpoint: str | None
    states: dict[str, Any]
    bf16: bool
    bf16_weights: bool  # see bf16_scope
    sampler: PromptSampler
    logger: MetricsLogger | None
    eval_reference: dict[str, float]  # held-out metrics of the starting policy
    last_metrics: dict[str, float]
    job: Distributed

    @classmethod
    def start(
        cls,
        config: OnlineConfig,
        build_trainable: Callable[[nn.Module], nn.Module],
        overwrite: bool,
        resume: bool,
        desc: str,
        states: dict[str, Any],
        check_job: Callable[[Distributed], None] | None = None,
    ) -> OnlineRun:
        """Validate every input, then load models, build the optimizer, prepare the run
        directory, resume from its last checkpoint when asked, and evaluate the starting
        policy (logged as step 0). ``build_trainable(policy)`` returns the module whose
        parameters are trained (the policy itself, or the policy with a critic).
        ``check_job(job)`` refuses settings that do not split over the ranks, before any
        file is touched."""
        started = time.time()
        set_threads()
        # 0. every input is validated before any compute or any file is touched
        inputs = load_run_inputs(config)
        device = config.torch_device()
        job = setup(config.distributed, config.prompts_per_step, "prompts_per_step", device)
        if check_job is not None:
            check_job(job)
        job.refuse_lora(config.lora.r > 0)
        check_output_dir(config.output_dir, overwrite, resume)
        job.barrier()  # every rank has checked before rank 0 creates or replaces it
        seed_everything(config.seed)
        policy = load_policy(config.model, config.lora, device)
        bf16 = config.use_bf16()
        # DDP's gradient buckets are fixed to the fp32 parameters and FSDP2 casts its own
        # shards: there, autocast over the fp32 weights alone
        bf16_weights = bf16 and not job.enabled
        reference = ReferencePolicy(policy, config.model, config.reference, bf16_weights)
        trainable = build_trainable(policy).to(device)  # a fresh value head or critic too
        trainable.train()
        plain, runner = trainable, None
        if job.sharded:
            # the plain copy first: fully_shard then replaces the trainable parameters by
            # shards (DTensors), and the optimizer is built over the shards
            plain = copy.deepcopy(trainable)
            runner = job.wrap(LossModule(trainable, _call))
        policy_name = next(name for name, m in trainable.named_modules() if m is policy)
        optimizer, scheduler = build_optimizer(
            trainable,
            config.lr,
            config.weight_decay,
            config.warmup_steps,
            config.max_steps,
            config.lr_schedule,
        )
        with main_first(job) as is_main:
            if is_main:
                prepare_output_dir(config.output_dir, overwrite, resume)
        output_dir = Path(config.output_dir)
        start_step, last_checkpoint, extra = 0, None, {}
        found = latest_checkpoint(output_dir) if resume else None
        if found is not None:
            load_state = None
            if job.sharded:

                def load_state(weights: dict, optimizer_state: dict) -> None:
                    job.load_full_state(trainable, optimizer, weights, optimizer_state)

            start_step, extra = load_checkpoint(found, trainable, optimizer, scheduler, load_state)
            for name, state in states.items():
                state.load_state_dict(extra[name])
            last_checkpoint = str(found)
        session = cls(
            config=config,
            started=started,
            inputs=inputs,
            policy=policy,
            reference=reference,
            trainable=trainable,
            plain=plain,
            rollout_policy=plain.get_submodule(policy_name),
            runner=runner,
            optimizer=optimizer,
            scheduler=scheduler,
            output_dir=output_dir,
            start_step=start_step,
            step=start_step,
            last_checkpoint=last_checkpoint,
            states=states,
            bf16=bf16,
            bf16_weights=bf16_weights,
            sampler=PromptSampler(len(inputs.train_prompts), config.prompts_per_step, config.seed),
            logger=(
                MetricsLogger(output_dir, config.max_steps, start_step, desc=desc)
                if job.is_main
                else None
            ),
            eval_reference=extra.get("eval_reference", {}),
            last_metrics={},
            job=job,
        )
        if found is not None:
            session.sync_plain()
        if start_step == 0 and inputs.eval_prompts and session.logger is not None:
            session.eval_reference = session.evaluate()
            session.logger.log(0, session.eval_reference)
        return session

    def forward(self, compute: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``compute(trainable, *args, **kwargs)``: the part of an update that needs
        gradients (the training forward and the loss). Under fsdp it runs inside the
        sharded root's forward, so FSDP2 gathers each layer's weights for it and reduces
        the gradients in the backward pass; ``compute`` returns its tensors in tuples or
        dicts (FSDP2 hooks the tensors it finds in them)."""
        if self.runner is None:
            return compute(self.trainable, *args, **kwargs)
        return self.runner((compute, args, kwargs))

    @contextlib.contextmanager
    def bf16_scope(self, update: bool = False) -> Iterator[None]:
        """Inside, with ``bf16_weights``, the trainable module computes from bf16 copies of
        its weights (:func:`alignkit.models.bf16_compute`); ``update``: also the fused
        MLPs and norms that save less for backward (:func:`alignkit.training.fused.fused_layers`).

        A step's sampling and no-grad scoring run in one scope, each update's forward
        *and* backward in another, closed before its optimizer step (on exit the bf16
        gradients join the fp32 ones). Every pass of the policy in a step then computes
        the same way: the rollout-time log-probs are those the update starts from, and
        the reference (bf16 too) matches the starting policy exactly. A no-op otherwise.
        """
        enabled = self.bf16_weights
        with bf16_compute(self.trainable, enabled=enabled):
            with fused_layers(self.trainable, enabled=enabled and update):
                yield

    def sync_plain(self) -> None:
        """Refresh ``plain`` from the shards (a collective; a no-op without fsdp)."""
        if self.runner is not None:
            self.job.copy_full_weights(self.trainable, self.plain)

    def gather_samples(
        self, samples: Any, per_row: dict[str, torch.Tensor] | None = None
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Every rank's scored samples (and per-row tensors such as reference sums) as the
        step's global batch, rows in rank order (:func:`concat_rollouts`)."""
        from alignkit.recipes.policy_gradient import concat_rollouts

        per_row = per_row or {}
        if not self.job.enabled:
            return samples, per_row
        parts = self.job.gather((samples, per_row))
        pad_id = self.inputs.tokenizer.pad_token_id
        gold = parts[0][0].gold
        merged = ScoredSamples(
            rollout=concat_rollouts([s.rollout for s, _ in parts], pad_id),
            prompts=[x for s, _ in parts for x in s.prompts],
            scores=torch.cat([s.scores for s, _ in parts]),
            gold=None if gold is None else torch.cat([s.gold for s, _ in parts]),
        )
        return merged, {key: torch.cat([extra[key] for _, extra in parts]) for key in per_row}

    def local_prompts(self, step: int) -> tuple[list[int], int | None]:
        """(this rank's prompt indices of step ``step``, the global index of its first row).

        The row index is None on a run without ``distributed``: the whole batch then
        samples from one stream. With it, every row samples from its own seed, so any
        number of ranks draws the same completions for the same global batch.
        """
        batch = self.sampler.indices(step)
        if self.config.distributed == "none":
            return batch, None
        start, stop = self.job.part(len(batch))
        return batch[start:stop], start * self.config.samples_per_prompt

    def sample_and_score(
        self, model: nn.Module, step: int, batch: list[int], first_row: int | None, n: int
    ) -> ScoredSamples:
        """``n`` completions of each training prompt in ``batch`` (:meth:`local_prompts` of
        ``step``) from ``model`` with the step's sampling settings, scored by the run's
        reward (and gold) function. Call it inside :meth:`bf16_scope`."""
        inputs = self.inputs
        return sample_and_score(
            model,
            inputs.tokenizer,
            [inputs.train_prompts[i] for i in batch],
            [inputs.train_ids[i] for i in batch],
            self.config.sampling(step),
            n,
            inputs.reward_fn,
            self.bf16,
            gold_fn=inputs.gold_fn,
            reward_name=self.config.reward,
            first_row=first_row,
        )

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics; every evaluation uses the same sampling seed (that of step 0)."""
        with self.bf16_scope():
            return evaluate(
                self.rollout_policy, self.inputs, self.config.sampling(0), self.bf16, self.reference
            )

    def end_of_step(self, step: int, metrics: dict[str, float], final: bool = False) -> bool:
        """Refresh ``plain``, evaluate when due, log, checkpoint when due; returns ``final``
        (stop the loop). Every rank calls it."""
        config = self.config
        self.sync_plain()
        is_last = final or step == config.max_steps
        due = config.eval_every > 0 and step % config.eval_every == 0
        if self.logger is not None:
            if self.inputs.eval_prompts and (due or is_last):
                metrics.update(self.evaluate())
            self.logger.log(step, metrics)
            self.logger.advance()
        self.step, self.last_metrics = step, metrics
        save = config.save_steps > 0 and step % config.save_steps == 0 and not is_last
        if not save:
            return final
        weights = optimizer_state = None
        if self.runner is not None:  # gathered on every rank, written by rank 0
            weights = trainable_state(self.plain)
            optimizer_state = self.job.full_optimizer_state(self.trainable, self.optimizer)
        if self.job.is_main:
            extra = {name: state.state_dict() for name, state in self.states.items()}
            extra["eval_reference"] = self.eval_reference
            extra["next_rollout_seed"] = rollout_seed(config.seed, step + 1)
            save_checkpoint(
                self.output_dir,
                step,
                self.trainable,
                self.optimizer,
                self.scheduler,
                extra=extra,
                keep_last=config.keep_last,
                weights=weights,
                optimizer_state=optimizer_state,
            )
        self.last_checkpoint = str(self.output_dir / "checkpoints" / f"step-{step:06d}")
        return final

    def finish(
        self, stopped: str, save_extra: Callable[[Path], None] | None = None
    ) -> dict[str, Any]:
        """Close the log; save the policy (plain HF directory), config and summary."""
        if self.logger is None:  # not rank 0: it writes everything
            self.job.barrier()
            return {"steps": self.step, "stopped": stopped, **self.last_metrics}
        self.logger.close()
        reference = {
            f"reference_{k.removeprefix('eval/')}": v for k, v in self.eval_reference.items()
        }
        summary = {"steps": self.step, "stopped": stopped, **reference, **self.last_metrics}
        save_run(
            self.rollout_policy,
            self.inputs.tokenizer,
            self.config,
            self.output_dir,
            summary,
            self.started,
        )
        if save_extra is not None:
            save_extra(self.output_dir)
        self.job.barrier()
        return summary


def _call(trainable: nn.Module, call: tuple[Callable[..., Any], tuple, dict]) -> Any:
    """The root loss module's forward under fsdp: ``compute(trainable, *args, **kwargs)``."""
    compute, args, kwargs = call
    return compute(trainable, *args, **kwargs)
