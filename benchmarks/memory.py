"""Peak RSS of alignkit's training steps on the embedded model, and the batch that fits 16 GB.

Each (recipe, batch size) runs in a fresh process: set-up, then ``steps`` optimizer
steps, then the process's high-water RSS (VmHWM). The largest batch under the budget
is extrapolated from a straight line through the measured points (memory grows
linearly with batch size once the weights and optimizer state are in); with
``check_largest`` it is then run: each recipe at its estimate, and again at a batch
rescaled from what that run measured, to bracket the largest batch that fits
(``--check-largest``; ``--cases`` picks the recipes).
"""

from __future__ import annotations

import sys
import threading
import time

from common import write_jsonl

BUDGET_MB = 16 * 1024
RECIPES = ("sft", "reward", "dpo", "ppo")
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


class OverBudget(RuntimeError):
    """A worker's RSS passed the limit it ran under, and it was stopped there."""


def _rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` now (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _stop_past(worker, limit_mb: float, tripped: threading.Event) -> None:
    """Kill ``worker`` as soon as its RSS passes ``limit_mb`` (polled every 0.2 s)."""
    while worker.process.poll() is None:
        if _rss_mb(worker.process.pid) > limit_mb:
            tripped.set()
            worker.process.kill()
            return
        time.sleep(0.2)


def measure(
    recipe: str, batch: int, workdir, env: dict, steps: int = 2, limit_mb: float | None = None
) -> float:
    """Peak RSS (MiB) of ``steps`` steps at ``batch``.

    With ``limit_mb`` the worker is killed once past it (:class:`OverBudget`): a batch
    over the budget need not run on to the machine's RAM and its OOM killer.
    """
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
    tripped = threading.Event()
    if limit_mb is not None:
        watch = threading.Thread(target=_stop_past, args=(worker, limit_mb, tripped), daemon=True)
        watch.start()
    try:
        for _ in range(steps):
            unit = worker.go()
            print(f"    {recipe} batch {batch}: {unit['seconds']:.1f}s", flush=True)
        worker.stop()
    except RuntimeError as err:
        if tripped.is_set():
            raise OverBudget(f"past {limit_mb:.0f} MiB, stopped") from err
        raise
    return worker.final["peak_rss_mb"]


def check_largest(recipe: str, fixed_mb: float, estimate: int, workdir, env: dict) -> dict:
    """Run ``recipe`` at the estimated largest batch, then once more from what it measured.

    The next batch comes from the line through the fixed part and the last run's peak,
    aimed at 98% of the budget; a run stopped past the budget, or killed for memory
    (None), halves the batch. At
    most three runs. Returns the batches run with their peaks and the largest of them
    under the budget (None if none fits).
    """
    runs: dict[int, float | None] = {}
    batch = estimate
    for _ in range(3):
        try:
            peak = measure(recipe, batch, workdir, env, limit_mb=BUDGET_MB)
        except RuntimeError as err:  # past the budget (or the OOM killer's, during set-up)
            print(f"  {recipe} batch {batch}: {err}", flush=True)
            runs[batch] = None
            batch //= 2
            continue
        runs[batch] = peak
        print(f"  {recipe} batch {batch}: peak {peak:.0f} MiB of {BUDGET_MB}", flush=True)
        per_row = (peak - fixed_mb) / batch
        following = int((0.98 * BUDGET_MB - fixed_mb) // per_row) if per_row > 0 else batch
        if following == batch or following in runs:
            break
        batch = following
    fitting = [b for b, peak in runs.items() if peak is not None and peak <= BUDGET_MB]
    return {"runs": runs, "largest_fitting_run": max(fitting) if fitting else None}


def memory_table(
    workdir, env: dict, batches=(2, 8), largest: bool = False, recipes=RECIPES
) -> dict:
    results = {}
    for recipe in recipes:
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
        if largest and fits:
            results[recipe]["largest_batch_16gb_runs"] = check_largest(
                recipe, base, fits, workdir, env
            )
    return results
