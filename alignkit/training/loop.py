"""The optimisation loop shared by the offline recipes (SFT, reward model, DPO family).

It is a function, not a framework: the recipe passes the model, a way to build a
batch from example indices and a loss function; the loop does accumulation,
autocast, the guarded optimizer step, logging, evaluation and checkpoints.
Online recipes (PPO, RLOO, ...) write their own loop from the same pieces.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.data.batching import length_grouped_batches
from alignkit.models import autocast, bf16_compute, model_device
from alignkit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.training.distributed import Distributed, LossModule, to_device
from alignkit.training.fused import fused_layers
from alignkit.training.metrics import MetricsLogger
from alignkit.training.optim import check_finite, optimizer_step

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class BatchPlan:
    """Micro-batch ``i`` of the run, deterministic from (lengths, batch size, seed).

    Epochs follow each other; each epoch is a fresh length-grouped shuffle. The
    plan needs only the micro-batch counter to resume exactly where a run stopped.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = -1
        self._batches: list[list[int]] = []

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, len(self))
        if epoch != self._epoch:
            self._batches = length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)
            self._epoch = epoch
        return self._batches[position]


@dataclass
class LoopResult:
    step: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    """Switch Adam/AdamW to their fused kernel when every parameter is a CPU float tensor.

    The default on CPU is the per-tensor loop: about ten elementwise passes (and as
    many thread-pool rounds) per parameter tensor; the fused kernel does one. Measured
    here: 0.5-1 s instead of 2.5-29 s per step for 135M parameters on a loaded machine
    (docs/benchmarks.md). The update is the same up to fp32 rounding. Call it before
    the first step; an explicit ``foreach`` or ``fused`` choice is kept.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(p.device.type != "cpu" or not p.is_floating_point() for p in params):
        return
    for group in optimizer.param_groups:
        explicit = group.get("foreach") or group.get("fused") is not None
        special = group.get("differentiable") or group.get("capturable")
        if not explicit and not special:
            group["fused"] = True


def _mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for part in parts for k in part}
    return {k: sum(p[k] for p in parts if k in p) / sum(1 for p in parts if k in p) for k in keys}


def train_loop(
    *,
    model: torch.nn.Module,
    plan: BatchPlan,
    make_batch: Callable[[list[int]], Batch],
    compute_loss: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    output_dir: Path,
    max_steps: int,
    grad_accum: int,
    max_grad_norm: float,
    bf16: bool,
    save_steps: int = 0,
    keep_last: int = 2,
    log_steps: int = 1,
    eval_steps: int = 0,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    desc: str = "",
    job: Distributed | None = None,
) -> LoopResult:
    """Run ``max_steps`` optimizer steps of ``grad_accum`` micro-batches each.

    Under ``torchrun`` (``job`` with several ranks) every rank takes its slice of
    each global micro-batch (a loss flagged ``token_mean`` is weighted by each rank's
    share of the micro-batch's ``tokens`` metric), DDP averages the gradients (or FSDP2 reduce-scatters
    them into the shards), and rank 0 alone writes metrics and checkpoints.
    ``evaluate(module)`` gets the model, or under FSDP2 the sharded loss module to call
    on a batch.
    """
    job = job or Distributed()
    token_mean = job.enabled and getattr(compute_loss, "token_mean", False)
    device = model_device(model)  # batches are built on the CPU and moved here
    start_step, last_checkpoint = 0, None
    if job.sharded:
        # fully_shard replaces the parameters by sharded ones: the optimizer follows
        old_names = {id(p): name for name, p in model.named_parameters()}
        runner = job.wrap(LossModule(model, compute_loss))
        new_params = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [new_params[old_names[id(p)]] for p in group["params"]]
    if resume:
        found = latest_checkpoint(output_dir)
        if found is not None:
            load_state = None
            if job.sharded:

                def load_state(weights: dict, optimizer_state: dict) -> None:
                    job.load_full_state(model, optimizer, weights, optimizer_state)

            start_step, _ = load_checkpoint(found, model, optimizer, scheduler, load_state)
            last_checkpoint = str(found)
    logger = MetricsLogger(output_dir, max_steps, start_step, desc=desc) if job.is_main else None
    if not job.sharded:
        runner = job.wrap(LossModule(model, compute_loss))
        use_fused_adam(optimizer)
    # bf16 copies of the weights for forward and backward, fp32 masters for the step;
    # DDP's gradient buckets are fixed to the fp32 parameters, so it keeps autocast alone.
    bf16_weights = bf16 and not job.enabled
    model.train()
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    try:
        for step in range(start_step + 1, max_steps + 1):
            parts = []
            for micro in range(grad_accum):
                indices = plan.indices((step - 1) * grad_accum + micro)
                batch = to_device(make_batch(job.shard(indices)), device)
                last_micro = micro == grad_accum - 1
                with job.no_sync(runner) if not last_micro else contextlib.nullcontext():
                    with bf16_compute(model, enabled=bf16_weights):
                        # MLPs and norms that save less for backward (fused.py)
                        with autocast(device, enabled=bf16), fused_layers(model, bf16_weights):
                            loss, part = runner(batch)
                        if token_mean:
                            # a mean over the batch's tokens: weight each rank's mean by
                            # its share of them, so the ranks' average is the global mean
                            loss = loss * job.token_share(float(part["tokens"]))
                        (loss / grad_accum).backward()
                part = {"loss": float(loss.detach()), **{k: float(v) for k, v in part.items()}}
                part = job.mean(part)
                if "tokens" in part:  # a count: the global micro-batch's, not a rank's
                    part["tokens"] *= job.world_size
                if token_mean and "ppl" in part:
                    part["ppl"] = math.exp(part["loss"])
                check_finite(part["loss"], "loss", step, last_checkpoint)
                parts.append(part)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            grad_norm = optimizer_step(
                model, optimizer, scheduler, max_grad_norm, step, last_checkpoint
            )
            metrics = {**_mean_metrics(parts), "grad_norm": grad_norm, "lr": lr}
            is_last = step == max_steps
            if evaluate is not None and (is_last or (eval_steps > 0 and step % eval_steps == 0)):
                eval_metrics = evaluate(runner if job.sharded else model)
                metrics.update(eval_metrics)
                model.train()
            if logger is not None:
                if step % log_steps == 0 or is_last:
                    logger.log(step, metrics)
                logger.advance()
            if save_steps > 0 and step % save_steps == 0 and not is_last:
                weights = optimizer_state = None
                if job.sharded:  # gathered on every rank, written by rank 0
                    weights = job.full_weights(model)
                    optimizer_state = job.full_optimizer_state(model, optimizer)
                if job.is_main:
                    save_checkpoint(
                        output_dir,
                        step,
                        model,
                        optimizer,
                        scheduler,
                        keep_last=keep_last,
                        weights=weights,
                        optimizer_state=optimizer_state,
                    )
                last_checkpoint = str(output_dir / "checkpoints" / f"step-{step:06d}")
    finally:
        if logger is not None:
            logger.close()
    return LoopResult(step=max_steps, last_metrics=metrics, eval_metrics=eval_metrics)


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: list[list[int]],
    make_batch: Callable[[list[int]], Batch],
    compute_loss: LossFn,
    bf16: bool,
) -> dict[str, float]:
    """Mean of ``compute_loss`` metrics over held-out batches, keys prefixed ``eval/``.

    ``model`` may be a (sharded) :class:`LossModule`, which computes the loss itself."""
    model.eval()
    parts = []
    is_loss = isinstance(model, LossModule)
    device = model_device(model)
    for indices in batches:
        with bf16_compute(model, enabled=bf16 and not is_loss), autocast(device, enabled=bf16):
            batch = to_device(make_batch(indices), device)
            loss, part = model(batch) if is_loss else compute_loss(model, batch)
        parts.append({"loss": float(loss), **{k: float(v) for k, v in part.items()}})
    return {f"eval/{k}": v for k, v in _mean_metrics(parts).items()}
