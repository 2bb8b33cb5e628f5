"""Optimizer, schedule and the guarded optimizer step."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from alignkit.errors import TrainingDiverged


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "linear",
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over trainable parameters (no decay on biases and norms) and a warm-up schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps
    )
    return optimizer, scheduler


def check_finite(value: float, what: str, step: int, last_checkpoint: str | None) -> None:
    """Stop the run when a loss or gradient norm is NaN/inf; name the step and checkpoint."""
    if not math.isfinite(value):
        where = last_checkpoint or "none (no checkpoint was written yet)"
        raise TrainingDiverged(
            f"{what} is {value} at step {step}; stopped before saving. Last good checkpoint: {where}"
        )


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
    step: int,
    last_checkpoint: str | None = None,
) -> float:
    """Clip, check for NaN/inf gradients, step, and zero the gradients; returns the grad norm."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = 0.0
    if params:
        total = torch.nn.utils.clip_grad_norm_(params, limit)
        # FSDP2's gradients are sharded DTensors: their norm is one too
        grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    check_finite(grad_norm, "gradient norm", step, last_checkpoint)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
