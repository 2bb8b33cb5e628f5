"""Run the whole alignment loop on the embedded model and write an HTML report."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from alignkit.config import check, doc
from alignkit.errors import InputError
from alignkit.eval.demo_support import (
    Stopwatch,
    choose_threads,
    finished_summary,
    make_config,
    release_memory,
    reward_gold_agreement,
    sample_completions,
)
from alignkit.jsonl import jsonl_lines
from alignkit.models import EMBEDDED_MODEL

console = Console(stderr=True, soft_wrap=True)

# method -> (recipe module, extra Config keys)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ppo": ("alignkit.recipes.ppo", {}),
    "rloo": ("alignkit.recipes.reinforce", {"algo": "rloo"}),
    "grpo": ("alignkit.recipes.reinforce", {"algo": "grpo"}),
    "dpo": ("alignkit.recipes.dpo", {}),
    "best_of_n": ("alignkit.recipes.best_of_n", {}),
    "rejection_sampling": ("alignkit.recipes.rejection_sampling", {}),
    "online_dpo": ("alignkit.recipes.online_dpo", {}),
    "distribution": ("alignkit.recipes.distribution", {"algo": "brain"}),
}


@dataclass
class DemoSettings:
    """The full demo (13.4 minutes measured on 2 idle cores); see :class:`QuickDemoSettings`."""

    output_dir: str = doc("run directory", "runs/demo")
    model: str = doc("starting policy", EMBEDDED_MODEL)
    task: str = doc("built-in task (prompts and gold judge)", "sentiment")
    methods: str = doc("comma-separated methods", ",".join(METHODS))
    sft: bool = doc("run SFT on gold-chosen samples first (see docs/demo.md)", False)
    sft_steps: int = doc("SFT optimizer steps", 24)
    feedback_prompts: int = doc("train prompts the panel ranks samples of", 128)
    k: int = doc("completions sampled per prompt for the panel", 4)
    max_new_tokens: int = doc("completion length everywhere (tokens)", 32)
    temperature: float = doc("sampling temperature everywhere (training and eval)", 0.7)
    annotators: int = doc("simulated annotators", 7)
    careless: int = doc("of which careless (random answers)", 2)
    adversarial: int = doc("of which adversarial (inverted preferences)", 1)
    overlap: int = doc("annotators per item", 3)
    annotator_noise: float = doc("careful annotators' Bradley-Terry noise (gold units)", 0.1)
    reward_steps: int = doc("reward-model optimizer steps", 80)
    reward_lr: float = doc("reward-model learning rate", 3e-5)
    policy_steps: int = doc("rollout steps of each online method", 16)
    rollout_rows: int = doc("completions per rollout step (prompts x samples)", 16)
    policy_lr: float = doc("online methods' learning rate", 1e-5)
    kl_coef: float = doc("KL coefficient towards the reference", 0.05)
    dpo_steps: int = doc("DPO optimizer steps (batch 8 pairs)", 48)
    dpo_lr: float = doc("DPO learning rate", 5e-6)
    bon_n: int = doc("n of best-of-n", 8)
    eval_prompts: int = doc("held-out prompts for the final evaluation", 64)
    threads: int = doc("torch threads; 0 = the idle cores (1 on a busy machine)", 0)
    jobs: int = doc(
        "methods trained at once, each in its own process with threads/jobs threads; "
        "0 = one per thread, at most 2",
        0,
    )
    seed: int = doc("seed of every stage", 0)

    def validate(self) -> None:
        unknown = [m for m in self.method_list() if m not in METHODS]
        check(not unknown, "methods", f"unknown {unknown} (known: {', '.join(METHODS)})")
        check(self.k >= 2, "k", "must be >= 2 to rank")
        check(0 <= self.careless + self.adversarial < self.annotators, "careless", "too many")
        check(2 <= self.overlap <= self.annotators, "overlap", "must be in [2, annotators]")
        check(self.rollout_rows >= 4, "rollout_rows", "must be >= 4")
        for name in ("feedback_prompts", "reward_steps", "policy_steps", "dpo_steps"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.eval_prompts >= 4, "eval_prompts", "must be >= 4")
        check(self.jobs >= 0, "jobs", "must be >= 0 (0 = one per thread, at most 2)")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass
class QuickDemoSettings(DemoSettings):
    """``--quick``: the same loop, sized for about 5 minutes (the CI run)."""

    feedback_prompts: int = doc("train prompts the panel ranks samples of", 32)
    sft_steps: int = doc("SFT optimizer steps", 8)
    max_new_tokens: int = doc("completion length everywhere (tokens)", 24)
    reward_steps: int = doc("reward-model optimizer steps", 24)
    policy_steps: int = doc("rollout steps of each online method", 4)
    rollout_rows: int = doc("completions per rollout step (prompts x samples)", 8)
    dpo_steps: int = doc("DPO optimizer steps (batch 8 pairs)", 12)
    bon_n: int = doc("n of best-of-n", 4)
    eval_prompts: int = doc("held-out prompts for the final evaluation", 24)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``alignkit demo [--quick] [--overwrite] [key=value ...]``; ``--help`` lists the keys."""
    from alignkit.config import field_help

    quick = {name: default for name, _, default in field_help(QuickDemoSettings)}
    lines = ["keys (key=value; full default, then --quick default where it differs):"]
    for name, text, default in field_help(DemoSettings):
        shown = f"{default}" if quick[name] == default else f"{default} / {quick[name]}"
        lines.append(f"  {name + '=' + shown:<34} {text}")
    parser.epilog = "\n".join(lines)
    parser.add_argument("--quick", action="store_true", help="the ~5 minute version (CI)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    parser.add_argument(
        "--resume", action="store_true", help="continue a stopped run in output_dir"
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of key: value settings")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. output_dir=runs/demo task=harmless"
    )


# --- stages ---


def run_sft(s: DemoSettings, task: Any, out: Path, watch: Stopwatch, resume: bool) -> str:
    """SFT on the task's train prompts with the gold judge's pick of k samples each."""
    from alignkit.feedback.aggregate import write_jsonl
    from alignkit.recipes import sft

    if finished_summary(out / "sft", resume) is not None:
        return str(out / "sft")

    with watch("sft"):
        prompts = task.prompts("train")[: s.feedback_prompts]
        samples = sample_completions(s.model, prompts, s.k, s.max_new_tokens, s.temperature, s.seed)
        rows = []
        for prompt, texts in zip(prompts, samples, strict=True):
            scores = task.gold([prompt] * len(texts), texts)
            rows.append(
                {
                    "prompt": prompt,
                    "completion": texts[max(range(len(texts)), key=scores.__getitem__)],
                }
            )
        write_jsonl(rows, out / "data" / "sft.jsonl")
        values = {
            "model": s.model, "data": str(out / "data" / "sft.jsonl"), "output_dir": str(out / "sft"),
            "max_steps": s.sft_steps, "batch_size": 8, "lr": 1e-5, "max_length": 192, "seed": s.seed,
        }  # fmt: skip
        sft.run(make_config(sft.Config, values, "sft"), overwrite=True)
    return str(out / "sft")


def run_feedback(
    s: DemoSettings, task: Any, start: str, out: Path, watch: Stopwatch, resume: bool
) -> Any:
    """Sample k per train prompt, let the panel rank them through the store, aggregate pairs."""
    import numpy as np

    from alignkit.eval.feedback_loop import load_feedback, make_items, run_panel, save_feedback

    pairs = out / "data" / "pairs.jsonl"
    if resume and (out / "feedback.json").is_file() and pairs.is_file():
        return load_feedback(out / "feedback.json", pairs)
    if (out / "feedback.db").exists():  # a panel killed halfway: start the store afresh
        (out / "feedback.db").unlink()

    with watch("sample"):
        prompts = task.prompts("train")[: s.feedback_prompts]
        samples = sample_completions(
            start, prompts, s.k, s.max_new_tokens, s.temperature, s.seed + 1
        )
        gold = np.array(
            [task.gold([p] * s.k, texts) for p, texts in zip(prompts, samples, strict=True)]
        )
    with watch("feedback"):
        items = make_items(prompts, samples, gold)
        result = run_panel(
            out / "feedback.db", items, lambda prompt, texts: task.gold([prompt] * len(texts), texts),
            s.annotators, s.careless, s.adversarial, s.overlap, s.annotator_noise, s.seed,
            out / "data" / "pairs.jsonl",
        )  # fmt: skip
        save_feedback(result, out / "feedback.json")
        release_memory()
        kinds = result.annotator_kinds
        console.print(
            f"{result.num_judgments} judgments on {result.num_items} items -> {result.num_pairs} "
            f"pairs; excluded {[f'{a} ({kinds[a]})' for a in result.excluded]}"
        )
    return result


def run_reward(
    s: DemoSettings, start: str, pairs: Path, out: Path, watch: Stopwatch, resume: bool
) -> dict:
    """The reward model on the panel's pairs (15% held out)."""
    from alignkit.recipes import reward

    done = finished_summary(out / "reward_model", resume)
    if done is not None:
        return done

    with watch("reward_model"):
        values = {
            "model": start, "data": str(pairs), "output_dir": str(out / "reward_model"),
            "eval_fraction": 0.15, "max_steps": s.reward_steps, "batch_size": 8,
            "lr": s.reward_lr, "max_length": 160, "use_margin": False, "seed": s.seed,
        }  # fmt: skip
        summary = reward.run(make_config(reward.Config, values, "reward"), overwrite=True)
        release_memory()
    console.print(f"reward model held-out accuracy {summary.get('eval/rewards/accuracy')}")
    return summary


def method_values(method: str, s: DemoSettings, start: str, rm: str, out: Path) -> dict[str, Any]:
    """The recipe's Config keys for ``method``, sized by the demo settings."""
    group = 4
    online = {
        "model": start, "task": s.task, "reward": rm, "output_dir": str(out / method),
        "max_steps": s.policy_steps, "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature, "lr": s.policy_lr, "kl_coef": s.kl_coef,
        "eval_prompts": 0, "seed": s.seed,
    }  # fmt: skip
    grouped = {"prompts_per_step": s.rollout_rows // group, "samples_per_prompt": group}
    rounds = max(1, s.policy_steps // 2)
    # these recipes log no per-step KL: a small held-out evaluation gives one (eval/kl)
    held_out = {"eval_prompts": 8, "eval_every": max(1, rounds // 3)}
    if method == "ppo":
        return {**online, "prompts_per_step": s.rollout_rows, "samples_per_prompt": 1, "epochs": 2,
                "missing_eos": "none"}  # fmt: skip
    if method in ("rloo", "grpo"):
        return {**online, **grouped, **METHODS[method][1], "missing_eos": "none"}
    if method == "distribution":
        return {**online, **grouped, **METHODS[method][1], **held_out,
                "eval_every": max(1, s.policy_steps // 3)}  # fmt: skip
    if method == "online_dpo":
        return {**online, **grouped, **held_out, "max_steps": rounds, "dpo_steps": 2,
                "batch_size": s.rollout_rows // group, "lr": 2 * s.dpo_lr}  # fmt: skip
    if method == "rejection_sampling":
        return {**online, **grouped, **held_out, "max_steps": rounds, "sft_steps": 2,
                "keep_top": 1, "batch_size": s.rollout_rows // group}  # fmt: skip
    if method == "dpo":
        return {"model": start, "data": str(_dpo_pairs(s, out)), "output_dir": str(out / method),
                "max_steps": s.dpo_steps, "batch_size": 8, "lr": s.dpo_lr, "beta": 0.1,
                "max_length": 160, "seed": s.seed}  # fmt: skip
    if method == "best_of_n":
        return {"model": start, "task": s.task, "reward": rm, "output_dir": str(out / method),
                "n": s.bon_n, "max_prompts": s.eval_prompts, "max_new_tokens": s.max_new_tokens,
                "temperature": s.temperature, "seed": s.seed}  # fmt: skip
    raise ValueError(method)


def _dpo_pairs(s: DemoSettings, out: Path) -> Path:
    """The pairs DPO trains on: a seeded sample of as many as its steps visit.

    DPO scores every row with the reference before its first step; rows its
    ``dpo_steps`` x 8 never reach would only cost that forward pass.
    """
    source, subset = out / "data" / "pairs.jsonl", out / "data" / "dpo_pairs.jsonl"
    lines = [line for line in jsonl_lines(source.read_text(encoding="utf-8")) if line.strip()]
    wanted = min(len(lines), s.dpo_steps * 8)
    chosen = sorted(random.Random(s.seed).sample(range(len(lines)), wanted))
    subset.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    return subset


def run_method(
    method: str, s: DemoSettings, start: str, rm: str, out: Path, watch: Stopwatch, resume: bool
) -> dict:
    """Run one method's recipe in-process: ``{"status", "seconds", "summary" | "error"}``.

    On ``resume`` a method whose run directory holds a summary is not run again.
    """
    done = finished_summary(out / method, resume)
    if done is not None and method in watch.stages:
        return {"status": "ok", "seconds": watch.stages[method]["wall_seconds"], "summary": done}
    module_name, _ = METHODS[method]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            console.print(f"note: {method} skipped: {module_name} is not in this build")
            return {"status": "missing", "seconds": 0.0, "error": f"{module_name} not found"}
        raise
    try:
        with watch(method) as stage:
            config = make_config(module.Config, method_values(method, s, start, rm, out), method)
            summary = module.run(config, overwrite=True, resume=False)
    except Exception as err:  # a recipe still being written must not sink the other methods
        (out / method).mkdir(parents=True, exist_ok=True)
        (out / method / "error.txt").write_text(traceback.format_exc())
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        console.print(
            f"[red]{method} failed[/red]: {message} (traceback in {out / method}/error.txt)"
        )
        return {"status": "failed", "seconds": 0.0, "error": message}
    finally:
        release_memory()
    return {"status": "ok", "seconds": stage.seconds, "summary": summary}


def run_methods(
    s: DemoSettings, start: str, rm: str, out: Path, watch: Stopwatch, resume: bool, threads: int
) -> tuple[dict[str, dict], int]:
    """Every method, ``jobs`` at a time; returns ``({method: run}, jobs)`` in method order.

    On 2 cores a 135M model does not keep two threads busy (two threads cost ~1.6x the
    CPU seconds of one for ~0.95x the wall time, measured in docs/demo.md), while two
    methods are independent: one process each, with one thread each, uses both cores.
    """
    methods = s.method_list()
    pending = [m for m in methods if not (finished_summary(out / m, resume) and m in watch.stages)]
    jobs = min(s.jobs or min(threads, 2), max(1, len(pending)))
    if jobs == 1:
        return {m: run_method(m, s, start, rm, out, watch, resume) for m in methods}, 1

    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    per_job = max(1, threads // jobs)
    (out / "logs").mkdir(exist_ok=True)
    console.rule(f"{len(pending)} methods, {jobs} at a time, {per_job} thread(s) each")
    console.print(f"each method's progress is in {out / 'logs'}/METHOD.log")
    runs: dict[str, dict] = {}
    with watch("methods"):  # its CPU seconds are its processes'
        with ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), max_tasks_per_child=1
        ) as pool:  # a fresh process per method: each hands all its memory back
            futures = {
                pool.submit(_method_process, m, s, start, rm, out, per_job): m for m in pending
            }
            for future in as_completed(futures):
                method = futures[future]
                try:
                    runs[method], timing = future.result()
                except Exception as err:  # the process died (killed, out of memory)
                    runs[method], timing = (
                        {"status": "failed", "seconds": 0.0, "error": repr(err)},
                        None,
                    )
                    console.print(f"[red]{method} failed[/red]: {err!r}")
                if timing is not None:
                    watch.record(method, timing["wall_seconds"], timing["cpu_seconds"], "methods")
    for m in methods:
        if m not in runs:  # finished before a resume: its summary is read back
            runs[m] = run_method(m, s, start, rm, out, watch, resume)
    return {m: runs[m] for m in methods}, jobs


def _method_process(
    method: str, s: DemoSettings, start: str, rm: str, out: Path, threads: int
) -> tuple[dict, dict | None]:
    """One method in a process of its own, its output in ``out/logs/METHOD.log``:
    ``(run, its wall and CPU seconds)``."""
    import torch

    log = os.open(out / "logs" / f"{method}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    watch = Stopwatch(out / "logs" / f"{method}.timings.json")
    run = run_method(method, s, start, rm, out, watch, resume=False)
    if run["status"] == "ok" and method != "best_of_n":  # sampled here, compared in the parent
        from alignkit.tasks import get_task

        run["samples"] = _evaluator(s, get_task(s.task), start, rm).sample_policy(
            method, str(out / method)
        )
    return run, watch.stages.get(method)


def _evaluator(s: DemoSettings, task: Any, start: str, rm: str) -> Any:
    """The held-out evaluation every method is measured by (same prompts, seeds, scorers)."""
    from alignkit.eval.evaluate import EvalSettings, Evaluator
    from alignkit.rewards import build_reward

    settings = EvalSettings(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            max_prompts=s.eval_prompts, seed=s.seed + 7)  # fmt: skip
    return Evaluator(task.prompts("eval"), task.gold, start, settings, reward_fn=build_reward(rm))


def evaluate_methods(
    s: DemoSettings,
    task: Any,
    start: str,
    rm: str,
    runs: dict[str, dict],
    out: Path,
    watch: Stopwatch,
) -> dict[str, Any]:
    """Every finished method against the starting policy on the held-out prompts (methods
    trained in a process of their own were sampled and scored there)."""
    from alignkit.eval.evaluate import json_ready
    from alignkit.recipes.best_of_n import kl_upper_bound

    with watch("evaluation"):
        evaluator = _evaluator(s, task, start, rm)
        result = {
            "task": task.name,
            **evaluator.describe(),
            "reference_metrics": evaluator.reference_summary(),
        }
        policies = []
        for method, run in runs.items():
            if run["status"] != "ok":
                continue
            if method == "best_of_n":
                text = (out / method / "best_of_n.jsonl").read_text(encoding="utf-8")
                rows = [json.loads(x) for x in jsonl_lines(text) if x.strip()]
                samples = evaluator.from_completions(
                    method,
                    [r["completion"] for r in rows],
                    kl_upper_bound(s.bon_n),
                    str(out / method),
                )
            else:
                samples = run.get("samples") or evaluator.sample_policy(method, str(out / method))
            policies.append(
                {**evaluator.compare(samples), "train_seconds": round(run["seconds"], 1)}
            )
            release_memory()
        result["policies"] = policies
        result["not_run"] = {m: r["error"] for m, r in runs.items() if r["status"] != "ok"}
    return json_ready(result)


def run_demo(s: DemoSettings, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """The whole loop; returns the evaluation with the demo's extras (also in ``results.json``).

    ``resume`` continues a killed run in the same ``output_dir`` with the same settings:
    finished stages (those with a ``summary.json``, the panel's ``feedback.json``) are
    kept, the rest runs; the evaluation and the report are always redone.
    """
    import torch

    from alignkit.eval.cli import print_table
    from alignkit.eval.report import build_report
    from alignkit.models import resolve_model
    from alignkit.tasks import get_task

    # 0. validate, prepare the run directory
    s.validate()
    task = get_task(s.task)
    out = Path(s.output_dir)
    settings_file = out / "settings.json"
    settings = {**dataclasses.asdict(s), "quick": isinstance(s, QuickDemoSettings)}
    if resume:
        if not settings_file.is_file():
            raise InputError("nothing to resume (no settings.json)", path=str(out))
        if json.loads(settings_file.read_text()) != settings:
            raise InputError(
                "was run with other settings; resume with the same ones", path=str(out)
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(
            "already exists; pass --overwrite to replace it or --resume to continue", path=str(out)
        )
    else:
        shutil.rmtree(out, ignore_errors=True)
        (out / "data").mkdir(parents=True)
        settings_file.write_text(json.dumps(settings, indent=2))
    threads = choose_threads(s.threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the recipes' set_threads() respects it
    watch = Stopwatch(out / "timings.json", resume)
    started = time.time()
    console.print(f"demo: {s.task} on {s.model}, {threads} thread(s), into {out}")
    base = resolve_model(s.model)
    # 1. SFT (optional), 2. sample + panel + pairs, 3. reward model
    start = run_sft(s, task, out, watch, resume) if s.sft else base
    feedback = run_feedback(s, task, start, out, watch, resume)
    reward_summary = run_reward(s, start, feedback.pairs_path, out, watch, resume)
    rm = str(out / "reward_model")
    # 4. every method, 5. evaluation against the starting policy
    runs, jobs = run_methods(s, start, rm, out, watch, resume, threads)
    evaluation = evaluate_methods(s, task, start, rm, runs, out, watch)
    evaluation["demo"] = {
        "settings": dataclasses.asdict(s),
        "quick": isinstance(s, QuickDemoSettings),
        "threads": threads,
        "jobs": jobs,
        "reward_model": {**reward_summary, "gold_agreement": reward_gold_agreement(evaluation)},
        "feedback": {"pairs": feedback.num_pairs, "excluded": feedback.excluded},
        "wall_seconds": watch.total("wall_seconds"),
        "cpu_seconds": watch.total("cpu_seconds"),
        "resumed": resume,
    }
    (out / "results.json").write_text(json.dumps(evaluation, indent=2))
    # 6. report
    with watch("report"):
        build_report(out)
    print_table(evaluation, title="demo")
    failed = [m for m, r in runs.items() if r["status"] == "failed"]
    console.print(
        f"demo finished in {time.time() - started:.0f} s: {out / 'report.html'}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return evaluation


def main(args: argparse.Namespace) -> int:
    """Parse the settings and run the demo; exit 1 when a recipe failed."""
    from alignkit.config import load_config

    settings_cls = QuickDemoSettings if args.quick else DemoSettings
    settings = load_config(settings_cls, None, args.config, args.overrides)
    if args.resume and args.overwrite:
        raise InputError("give --resume or --overwrite, not both", path="command line")
    evaluation = run_demo(settings, overwrite=args.overwrite, resume=args.resume)
    failed = [m for m, error in evaluation["not_run"].items() if not error.endswith("not found")]
    return 1 if failed else 0
