"""Small pieces the demo is built from: threads, stage timing, memory, configs, sampling.

Kept apart from :mod:`alignkit.demo` so that module reads as the pipeline itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def choose_threads(requested: int) -> int:
    """``requested``, or the cores not busy right now (at least 1).

    Two threads on a machine whose other processes keep both cores busy wait on each
    other at every barrier: measured here, one thread was 5x faster under load.
    """
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(round(cores - busy))))


class Stopwatch:
    """Wall and CPU seconds of each named stage, written to ``timings.json``."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path, self.stages = path, {}
        if resume and path.is_file():
            self.stages = json.loads(path.read_text())

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)

    def record(self, name: str, wall: float, cpu: float, within: str | None = None) -> None:
        """``within`` names the stage this one ran inside, beside others (parallel methods)."""
        self.stages[name] = {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)}
        if within is not None:
            self.stages[name]["within"] = within
        self.path.write_text(json.dumps(self.stages, indent=2))
        console.print(f"[bold]{name}[/bold] done in {wall:.1f} s (cpu {cpu:.1f} s)")

    def total(self, key: str) -> float:
        """``wall_seconds`` or ``cpu_seconds`` of the whole run; stages that ran beside
        each other count once, as the block they ran ``within``."""
        return round(sum(v[key] for v in self.stages.values() if "within" not in v), 1)


class _Stage:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> _Stage:
        console.rule(self.name)
        self.wall, self.cpu = time.time(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, cpu = time.time() - self.wall, _cpu_seconds() - self.cpu
        self.seconds = wall
        self.watch.record(self.name, wall, cpu)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Each stage loads and drops its own models; without the trim the process keeps the
    high-water mark of every stage resident, measured here at ~5 GB after the reward model.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def make_config(config_cls: type, values: dict[str, Any], method: str) -> Any:
    """``config_cls(**values)`` keeping only keys it has (recipes evolve), validated."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    dropped = sorted(set(values) - names)
    if dropped:
        console.print(f"note: {method} has no keys {dropped}; they keep their defaults")
    config = config_cls(**{k: v for k, v in values.items() if k in names})
    if hasattr(config, "validate"):
        config.validate()
    return config


def sample_completions(
    model_dir: str, prompts: list, k: int, max_new_tokens: int, temperature: float, seed: int
) -> list[list[str]]:
    """``k`` completions per prompt from the model at ``model_dir``."""
    from alignkit.models import load_policy, load_tokenizer
    from alignkit.recipes.online import encode_prompts, rollout_seed
    from alignkit.rollout import SamplingParams, generate

    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir).eval().requires_grad_(False)
    ids = encode_prompts(tokenizer, prompts, 128)
    out: list[list[str]] = []
    for batch, start in enumerate(range(0, len(ids), 16)):
        params = SamplingParams(max_new_tokens, temperature, seed=rollout_seed(seed, batch))
        rollout = generate(model, tokenizer, ids[start : start + 16], params, num_samples=k)
        texts = rollout.completions
        out += [texts[i * k : (i + 1) * k] for i in range(len(texts) // k)]
    return out


def finished_summary(folder: Path, resume: bool) -> dict[str, Any] | None:
    """On ``resume``, the ``summary.json`` of a stage that finished before; else None."""
    path = folder / "summary.json"
    return json.loads(path.read_text()) if resume and path.is_file() else None


def reward_gold_agreement(evaluation: dict[str, Any], min_gap: float = 0.1) -> float:
    """How often the reward model orders two completions of the same prompt as gold does.

    Pairs are all evaluated samples (reference and every method) of one prompt whose gold
    scores differ by more than ``min_gap``; across prompts the comparison would mostly
    measure the prompts' own sentiment, which a within-prompt reward model never learns.
    """
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for system in [evaluation["reference_metrics"], *evaluation["policies"]]:
        for row in system.get("samples", []):
            if "reward" in row:
                by_prompt.setdefault(row["prompt_index"], []).append(row)
    agree = total = 0
    for rows in by_prompt.values():
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                if abs(a["gold"] - b["gold"]) > min_gap:
                    total += 1
                    agree += (a["gold"] > b["gold"]) == (a["reward"] > b["reward"])
    return agree / total if total else math.nan
