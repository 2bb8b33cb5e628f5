"""Set-up and wrap-up shared by the offline recipes: data split, run directory, saving."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from alignkit.config import save_config
from alignkit.models import is_lora, save_model
from alignkit.training.common import TrainConfig
from alignkit.training.distributed import Distributed, setup

console = Console(stderr=True, soft_wrap=True)


def split_holdout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded ``fraction`` of ``count`` rows held out."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    held = int(round(count * fraction))
    if fraction > 0 and held == 0 and count > 1:
        held = 1
    return sorted(order[held:]), sorted(order[:held])


def load_examples(loader: Any, source: str, invalid_rows: str, **kwargs: Any) -> list:
    """Load with ``loader``; with ``invalid_rows=skip`` bad rows are counted and reported."""
    if invalid_rows != "skip":
        return loader(source, **kwargs)
    skipped: list = []
    examples = loader(source, skipped=skipped, **kwargs)
    if skipped:
        console.print(f"{source}: skipped {len(skipped)} invalid rows (first: {skipped[0]})")
    return examples


def report_lengths(report: Any, max_length: int, what: str) -> None:
    """One line on rows that were over ``max_length``."""
    if report.truncated or report.dropped:
        console.print(
            f"{what}: {report.truncated} of {report.total} rows over max_length={max_length} "
            f"were truncated, {report.dropped} dropped"
        )


def save_run(
    model: torch.nn.Module,
    tokenizer: Any,
    config: TrainConfig,
    output_dir: Path,
    summary: dict[str, Any],
    started: float,
) -> None:
    """Model, tokenizer, resolved config and a JSON summary into ``output_dir``."""
    save_model(model, tokenizer, output_dir)
    save_config(config, output_dir / "alignkit_config.yaml")
    summary = {**summary, "wall_seconds": round(time.time() - started, 2)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    shown = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
    )
    console.print(f"saved {output_dir} ({shown})")


def load_rows(
    config: TrainConfig, tokenizer: Any, loader: Any, tokenize: Any, **load_kwargs: Any
) -> tuple[list, list[int], list[int]]:
    """Load, validate and tokenize ``data`` (and ``eval_data``): (rows, train ids, eval ids)."""
    sources = [config.data] + ([config.eval_data] if config.eval_data else [])
    tokenized = []
    for source in sources:
        examples = load_examples(loader, source, config.invalid_rows, **load_kwargs)
        rows, report = tokenize(
            examples,
            tokenizer,
            config.max_length,
            config.max_prompt_length or None,
            config.overlong,
        )
        report_lengths(report, config.max_length, source)
        tokenized.append(rows)
    eval_count = len(tokenized[1]) if config.eval_data else 0
    train_ids, eval_ids = train_eval_indices(
        len(tokenized[0]), eval_count, config.eval_fraction, config.seed
    )
    return [row for part in tokenized for row in part], train_ids, eval_ids


def train_eval_indices(
    train_count: int, eval_count: int, eval_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Rows ``[0, train_count)`` come from ``data`` and the rest from ``eval_data``.

    Without ``eval_data`` a seeded ``eval_fraction`` of ``data`` is held out.
    """
    if eval_count:
        return list(range(train_count)), list(range(train_count, train_count + eval_count))
    return split_holdout(train_count, eval_fraction, seed)


def start_job(config: TrainConfig, model: torch.nn.Module) -> Distributed:
    """Join the torchrun job, if any, and refuse a distributed setting it cannot run (no
    ``distributed=`` on several processes, a batch that does not split over them, LoRA
    under ``fsdp``): called once the model is loaded, before any forward pass (the
    reference log-probs) and before any file or cache entry is written."""
    job = setup(config.distributed, config.batch_size, device=config.torch_device())
    job.refuse_lora(is_lora(model))
    return job


def fit(
    *,
    job: Distributed,
    config: TrainConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    row_lengths: list[int],
    train_ids: list[int],
    eval_ids: list[int],
    make_batch: Any,
    compute_loss: Any,
    overwrite: bool,
    resume: bool,
    desc: str,
    started: float,
    extra_summary: dict[str, Any] | None = None,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Optimise ``compute_loss`` over the train rows, evaluate on the held-out rows, save.
    ``job`` is :func:`start_job`'s."""
    from alignkit.training.common import prepare_output_dir, seed_everything
    from alignkit.training.distributed import main_first
    from alignkit.training.loop import BatchPlan, evaluate_batches, train_loop
    from alignkit.training.optim import build_optimizer

    if output_dir is None:
        with main_first(job) as is_main:
            output_dir = (
                prepare_output_dir(config.output_dir, overwrite, resume) if is_main else None
            )
        output_dir = Path(config.output_dir)
    seed_everything(config.seed)
    optimizer, scheduler = build_optimizer(
        model,
        config.lr,
        config.weight_decay,
        config.warmup_steps,
        config.max_steps,
        config.lr_schedule,
    )
    plan = BatchPlan([row_lengths[i] for i in train_ids], config.batch_size, config.seed)
    bf16 = config.use_bf16()
    evaluate = None
    if eval_ids:
        size = config.batch_size
        eval_batches = [eval_ids[i : i + size] for i in range(0, len(eval_ids), size)]

        def evaluate(module: torch.nn.Module) -> dict[str, float]:
            return evaluate_batches(module, eval_batches, make_batch, compute_loss, bf16)

    result = train_loop(
        model=model,
        plan=plan,
        make_batch=lambda positions: make_batch([train_ids[p] for p in positions]),
        compute_loss=compute_loss,
        optimizer=optimizer,
        scheduler=scheduler,
        output_dir=output_dir,
        max_steps=config.max_steps,
        grad_accum=config.grad_accum,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        save_steps=config.save_steps,
        keep_last=config.keep_last,
        log_steps=config.log_steps,
        eval_steps=config.eval_steps,
        evaluate=evaluate,
        resume=resume,
        desc=desc,
        job=job,
    )
    summary = {
        "steps": result.step,
        "train_rows": len(train_ids),
        "eval_rows": len(eval_ids),
        **(extra_summary or {}),
        **result.last_metrics,
    }
    if job.sharded:
        job.unshard_for_saving(model)  # full tensors again, for a plain HF directory
    if job.is_main:
        save_run(model, tokenizer, config, output_dir, summary, started)
    job.barrier()
    return summary
