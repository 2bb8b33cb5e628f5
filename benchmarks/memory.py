"""Peak RSS of alignkit's training steps on the embedded model, and the batch that fits 16 GB.

Each (recipe, batch size) runs in a fresh process: set-up, then ``steps`` optimizer
steps, then the process's high-water RSS (VmHWM). The largest batch under the budget
is extrapolated from a straight line through the measured points (memory grows
linearly with batch size once the weights and optimizer state are in).
"""

from __future__ import annotations

import sys

from common import write_jsonl

BUDGET_MB = 16 * 1024
MAX_LENGTH = 512


def _params(recipe: str, batch: int, workdir) -> dict:
    from run import MODEL, fitting_rows, short_prompts

    if recipe == "ppo":
        prompts = short_prompts(64, MAX_LENGTH - 64)
        return {
            "model": MODEL,
            "data": str(write_jsonl(workdir / "ppo-prompts.jsonl", prompts)),
            "reward": "common:length_reward",
            "prompts_per_step": batch,
            "max_prompt_length": MAX_LENGTH - 64,
            "max_new_tokens": 64,
            "eval_prompts": 0,
            "bf16": "true",
        }
    rows = fitting_rows(batch * 3, MAX_LENGTH)
    data = workdir / f"mem-{recipe}-{batch}.jsonl"
    if recipe == "sft":
        write_jsonl(data, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    else:
        write_jsonl(data, rows)
    return {
        "model": MODEL,
        "data": str(data),
        "batch_size": batch,
        "max_length": MAX_LENGTH,
        "eval_fraction": 0.0,
        "bf16": "true",
    }


def measure(recipe: str, batch: int, workdir, env: dict, steps: int = 2) -> float:
    from run import start

    worker = start(
        f"mem-{recipe}-{batch}",
        "alignkit",
        recipe,
        _params(recipe, batch, workdir),
        workdir,
        sys.executable,
        env,
    )
    for _ in range(steps):
        unit = worker.go()
        print(f"    {recipe} batch {batch}: {unit['seconds']:.1f}s", flush=True)
    worker.stop()
    return worker.final["peak_rss_mb"]


def memory_table(workdir, env: dict, batches=(2, 8)) -> dict:
    results = {}
    for recipe in ("sft", "reward", "dpo", "ppo"):
        points = {b: measure(recipe, b, workdir, env) for b in batches}
        low, high = min(points), max(points)
        slope = (points[high] - points[low]) / (high - low)
        base = points[low] - slope * low
        fits = int((BUDGET_MB - base) // slope) if slope > 0 else None
        results[recipe] = {
            "peak_rss_mb": points,
            "mb_per_batch_row": slope,
            "fixed_mb": base,
            "largest_batch_16gb_estimate": fits,
        }
        print(f"  {recipe}: {points} -> ~{slope:.0f} MiB per row, fits ~{fits} in 16 GB")
    return results
