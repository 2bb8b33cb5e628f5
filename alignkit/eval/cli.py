"""Evaluate policies against a reference: gold win rate with intervals, reward, KL, length."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from alignkit.errors import InputError
from alignkit.jsonl import jsonl_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``alignkit eval --task T --policy NAME=DIR ... --reference DIR [options]``."""
    parser.add_argument(
        "--task", default="sentiment", help="built-in task, or a name for --prompts"
    )
    parser.add_argument(
        "--prompts", help="prompts JSONL ({'prompt', 'split'}); its eval split is used"
    )
    parser.add_argument("--gold", help="module:function gold judge for --prompts")
    parser.add_argument("--chat", action="store_true", help="--prompts are user turns")
    parser.add_argument(
        "--policy", action="append", default=[], metavar="NAME=DIR", help="a policy (repeat)"
    )
    parser.add_argument(
        "--completions",
        action="append",
        default=[],
        metavar="NAME=FILE[,FILE...]",
        help="a system given as completions, e.g. alignkit bon's best_of_n.jsonl (repeat); "
        "one row per eval prompt, in order; file j gives sample j",
    )
    parser.add_argument("--reference", required=True, help="reference policy directory")
    parser.add_argument("--reward", help="reward-model directory: adds a reward-judged win rate")
    parser.add_argument(
        "--judge", help="LLM judge: local:DIR or openai:URL,MODEL (both orders asked)"
    )
    parser.add_argument("--judge-principle", help="the judge's criterion (default: per task)")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-prompts", type=int, default=0, help="first N prompts; 0 = all")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument(
        "--tie-tolerance", type=float, default=0.0, help="score gap counted as a tie"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="auto",
        help="where the models run: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), "
        "cpu, cuda, cuda:N",
    )
    parser.add_argument("--output", default="eval.json", help="output JSON path")


def parse_policies(specs: list[str], allow_empty: bool = False) -> dict[str, str]:
    """``NAME=DIR`` strings -> {name: dir}; one-line errors for a bad or repeated spec."""
    if not specs and not allow_empty:
        raise InputError("give at least one --policy NAME=DIR", field="--policy")
    policies: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"expected NAME=DIR, got {spec!r}", field="--policy")
        if name in policies or name == "reference":
            raise InputError(f"name {name!r} is used twice (or is 'reference')", field="--policy")
        _check_model_dir(path, "--policy")
        policies[name] = path
    return policies


def parse_completions(specs: list[str], taken: set[str]) -> dict[str, list[str]]:
    """``NAME=FILE[,FILE...]`` strings -> {name: [files]}; one-line errors for bad specs."""
    systems: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        paths = [f for f in files.split(",") if f.strip()] if sep else []
        if not name.strip() or not paths:
            raise InputError(f"expected NAME=FILE[,FILE...], got {spec!r}", field="--completions")
        if name in systems or name in taken or name == "reference":
            raise InputError(
                f"name {name!r} is used twice (or is 'reference')", field="--completions"
            )
        for path in paths:
            if not Path(path).is_file():
                raise InputError("file not found", path=path, field="--completions")
        systems[name] = paths
    return systems


def read_completions(
    paths: list[str], prompts: list[Any], samples_per_prompt: int
) -> tuple[list[str], int | None]:
    """The completions of ``paths`` in the evaluator's order (row i*k + j answers prompt i).

    Each file has one JSON row per eval prompt, in the eval prompts' order, with the row's
    ``prompt`` and either ``completion`` (one sample, as ``alignkit bon`` writes) or
    ``completions`` (a list, as ``alignkit sample`` writes); sample j of a prompt comes
    from the files in the order given. Also returns n when the rows carry best-of-n's
    ``rewards`` list (for the KL bound), else None.
    """
    per_prompt: list[list[str]] = [[] for _ in prompts]
    best_of: set[int] = set()
    for path in paths:
        lines = [x for x in jsonl_lines(Path(path).read_text(encoding="utf-8")) if x.strip()]
        if len(lines) < len(prompts):
            raise InputError(f"has {len(lines)} rows, the task has {len(prompts)} eval prompts",
                             path=path, field="--completions")  # fmt: skip
        for number, (line, prompt) in enumerate(zip(lines, prompts, strict=False), start=1):
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"not JSON ({error.msg})", path=where) from None
            if not isinstance(row, dict) or row.get("prompt") != prompt:
                raise InputError("prompt differs from the eval prompt", path=where, field="prompt")
            texts = row["completions"] if "completions" in row else [row.get("completion")]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise InputError("expected a string (or a list of strings)",
                                 path=where, field="completion")  # fmt: skip
            per_prompt[number - 1].extend(texts)
            if isinstance(row.get("rewards"), list):
                best_of.add(len(row["rewards"]))
    for number, texts in enumerate(per_prompt, start=1):
        if len(texts) != samples_per_prompt:
            raise InputError(
                f"prompt {number} has {len(texts)} completions, --samples-per-prompt is "
                f"{samples_per_prompt}",
                field="--completions",
            )
    return [t for texts in per_prompt for t in texts], (
        best_of.pop() if len(best_of) == 1 else None
    )


def _check_model_dir(path: str, field: str) -> None:
    from alignkit.models import EMBEDDED_MODEL, TINY_MODEL

    if path in (EMBEDDED_MODEL, TINY_MODEL):
        return
    if not Path(path).is_dir():
        raise InputError("model directory not found", path=path, field=field)
    if not (Path(path) / "config.json").is_file():
        raise InputError("not a model directory (no config.json)", path=path, field=field)


def parse_judge(spec: str | None, device: Any = "cpu") -> Any:
    """``local:DIR`` (on ``device``) or ``openai:URL,MODEL`` -> a judge (None when not given)."""
    if not spec:
        return None
    from alignkit.eval.judge_cli import make_judge

    kind, _, rest = spec.partition(":")
    if kind == "local" and rest:
        _check_model_dir(rest, "--judge")
        return make_judge(judge_model=rest, device=device)
    if kind == "openai" and "," in rest:
        url, _, model = rest.rpartition(",")
        return make_judge(openai_base_url=url, openai_model=model)
    raise InputError(f"expected local:DIR or openai:URL,MODEL, got {spec!r}", field="--judge")


def _load_task(args: argparse.Namespace) -> Any:
    from alignkit.tasks import get_task, register_task

    if args.prompts:
        if not args.gold:
            raise InputError("is required with --prompts (module:function)", field="--gold")
        name = args.task if args.task != "sentiment" else "custom"
        return register_task(name, args.prompts, args.gold, chat=args.chat)
    return get_task(args.task)


def _check_output(path: str) -> Path:
    output = Path(path)
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise InputError("is a directory", path=path, field="--output")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(
            "its folder does not exist or is not writable", path=path, field="--output"
        )
    return output


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` through a temporary file renamed into place."""
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(staging, path)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def print_table(result: dict[str, Any], title: str = "evaluation") -> None:
    """The policies as a rich table: win rates with intervals, gold, KL, length, distinct-2."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: {result.get('task', '')} vs {result['reference']}")
    has_reward = any("reward_win_rate" in p for p in result["policies"])
    has_judge = any("judge_win_rate" in p for p in result["policies"])
    for column in ["policy", "gold win rate [95% Wilson]", "ties", "gold", "KL k3 (k1)"]:
        table.add_column(column, justify="left" if column == "policy" else "right")
    if has_reward:
        table.add_column("RM win rate", justify="right")
    if has_judge:
        table.add_column("judge win rate (consistency)", justify="right")
    for column in ["tokens", "distinct-2", "seconds"]:
        table.add_column(column, justify="right")
    reference = result["reference_metrics"]
    table.add_row(
        "reference", "0.5", "", _fmt(reference["gold"]["estimate"]), "0",
        *([""] if has_reward else []), *([""] if has_judge else []),
        _fmt(reference["length"]["mean_tokens"], 1), _fmt(reference["distinct_2"]),
        _fmt(reference["eval_seconds"], 1),
    )  # fmt: skip
    for policy in result["policies"]:
        win = policy["gold_win_rate"]
        kl = policy["kl"]
        kl_text = (
            f"{_fmt(kl['k3'])} ({_fmt(kl['k1'])})"
            if kl["k3"] is not None
            else f"<= {_fmt(kl['upper_bound'])}"
        )
        row = [
            policy["name"],
            f"{_fmt(win['win_rate'])} [{_fmt(win['low'])}, {_fmt(win['high'])}]",
            _fmt(win["tie_rate"], 2),
            _fmt(policy["gold"]["estimate"]),
            kl_text,
        ]
        if has_reward:
            row.append(_fmt(policy.get("reward_win_rate", {}).get("win_rate")))
        if has_judge:
            judged = policy.get("judge_win_rate", {})
            row.append(
                f"{_fmt(judged.get('win_rate'))} ({_fmt(judged.get('consistency_rate'), 2)})"
            )
        row += [
            _fmt(policy["length"]["mean_tokens"], 1),
            _fmt(policy["distinct_2"]),
            _fmt(policy["eval_seconds"], 1),
        ]
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze to 80 columns
        console = Console(width=160)
    console.print(table)


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; write the JSON and print the table."""
    from alignkit.eval.evaluate import JUDGE_PRINCIPLES, EvalSettings, Evaluator, json_ready
    from alignkit.models import resolve_device
    from alignkit.training.common import set_threads

    # 0. validate every input before loading a model
    device = resolve_device(args.device, key="--device", source="command line")
    policies = parse_policies(args.policy, allow_empty=bool(args.completions))
    given = parse_completions(args.completions, set(policies))
    _check_model_dir(args.reference, "--reference")
    output = _check_output(args.output)
    settings = EvalSettings(
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_prompts=args.max_prompts,
        seed=args.seed,
        bootstrap_resamples=args.bootstrap,
        tie_tolerance=args.tie_tolerance,
        device=str(device),
    )
    settings.validate()
    task = _load_task(args)
    eval_prompts = task.prompts("eval")[: args.max_prompts or None]
    completions = {
        name: read_completions(paths, eval_prompts, settings.samples_per_prompt)
        for name, paths in given.items()
    }
    if args.reward is not None:
        _check_model_dir(args.reward, "--reward")
    set_threads()
    from alignkit.rewards import build_reward

    reward_fn = build_reward(args.reward, source="--reward", device=device) if args.reward else None
    judge = parse_judge(args.judge, device)
    principle = args.judge_principle or JUDGE_PRINCIPLES.get(task.name)
    # 1. sample the reference once, then each policy; 2. compare
    evaluator = Evaluator(
        task.prompts("eval"),
        task.gold_on(device),  # the harmless judge's encoder on --device too
        args.reference,
        settings,
        reward_fn=reward_fn,
        judge=judge,
        **({"judge_principle": principle} if principle else {}),
    )
    result = {"task": task.name, **evaluator.describe()}
    result["reference_metrics"] = evaluator.reference_summary()
    result["policies"] = [
        evaluator.compare(evaluator.sample_policy(name, path)) for name, path in policies.items()
    ]
    from alignkit.recipes.best_of_n import kl_upper_bound

    for name, (texts, n) in completions.items():
        bound = kl_upper_bound(n) if n else None
        samples = evaluator.from_completions(name, texts, kl_upper_bound=bound, path=given[name][0])
        result["policies"].append(evaluator.compare(samples))
    result = json_ready(result)
    # 3. write and show
    write_json(result, output)
    print_table(result)
    print(f"wrote {output}")
    return 0
