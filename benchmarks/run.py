"""alignkit side by side with TRL / HF generate on this machine: ``make bench``.

Every case starts alignkit and its peer as separate processes on the same model, rows,
batch size, max_length, precision and sampling settings, lets each set up (model
loading, reference log-probs and other one-off work are not timed), and then runs
their steps interleaved, one process at a time, so machine load hits both alike.
The first ``--warmup`` steps of each are dropped. The bf16 matmul peak is measured
between rounds in this process, for MFU. Ratios come from one run.

    python benchmarks/run.py                        # every case
    python benchmarks/run.py --cases dpo,generate --steps 3
    python benchmarks/run.py memory                 # peak RSS table (alignkit only)
    python benchmarks/run.py memory --check-largest # and run the largest batch for 16 GB
    python benchmarks/run.py allocator              # DPO steps, tcmalloc against glibc malloc
    python benchmarks/run.py allocator --variant skip-sbrk --cases dpo,rl,generate

The peer runs with the Python given by ``--peer-python`` (default ``.venv-bench``,
a venv with TRL that sees the project's packages); alignkit runs with the project's
Python and the runtime environment the ``alignkit`` command sets for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this tree's alignkit

from common import HERE, MARK, REPO, hh_pairs, write_jsonl  # noqa: E402

MODEL = "smollm2-135m-instruct"


@dataclass
class Worker:
    """One benchmark process and what it reported."""

    name: str
    side: str  # "alignkit" or "peer"
    process: subprocess.Popen
    log: Path
    ready: dict = field(default_factory=dict)
    units: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)

    def read(self, wanted: str) -> dict:
        """Lines up to the next message ``wanted``; other output goes to the log."""
        with open(self.log, "a") as log:
            while True:
                line = self.process.stdout.readline()
                if not line:
                    code = self.process.wait()
                    raise RuntimeError(f"{self.name} exited ({code}); see {self.log}")
                if not line.startswith(MARK):
                    log.write(line)
                    continue
                message = json.loads(line[len(MARK) :])
                if message["event"] == wanted:
                    return message
                log.write(line)

    def go(self, argument: str = "") -> dict:
        self.process.stdin.write(f"go {argument}\n")
        self.process.stdin.flush()
        unit = self.read("unit")
        self.units.append(unit)
        return unit

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()
            self.final = self.read("final")
            self.process.wait(timeout=120)


_SETTLED_ENV: dict[str, str] = {}


def alignkit_env() -> dict[str, str]:
    """The environment ``alignkit`` re-executes itself in (allocator, OpenMP waits).

    Settled once, when the coordinator starts: ``runtime_env`` looks at how busy the
    machine is, and later the benchmark's own workers would be what it sees.
    ``PYTHONPATH`` starts with this tree, so a worktree's worker runs its own alignkit,
    not the editable install the venv points at.
    """
    if not _SETTLED_ENV:
        from alignkit.cli import runtime_env

        env = runtime_env(dict(os.environ))
        env = env if env is not None else dict(os.environ)
        paths = [str(REPO), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        _SETTLED_ENV.update(env)
    return dict(_SETTLED_ENV)


def peer_env(args) -> dict[str, str]:
    """The peer's environment: as users run it, or alignkit's (allocator, OpenMP waits)."""
    if args.peer_env == "alignkit":
        return {k: v for k, v in alignkit_env().items() if k != "ALIGNKIT_RUNTIME"}
    return dict(os.environ)


def start(
    name: str, side: str, case: str, params: dict, workdir: Path, python: str, env: dict
) -> Worker:
    script = HERE / ("worker_alignkit.py" if side == "alignkit" else "worker_trl.py")
    params_file = workdir / f"{name}.json"
    params_file.write_text(json.dumps(params))
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        [python, "-u", str(script), case, str(params_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(workdir / f"{name}.stderr", "w"),
        text=True,
        env={**env, "TOKENIZERS_PARALLELISM": "false"},
        cwd=str(REPO),
    )
    worker = Worker(name, side, process, log)
    worker.ready = worker.read("ready")
    print(f"  {name}: ready after {worker.ready['setup_seconds']:.0f}s", flush=True)
    return worker


def matmul_peak(seconds: float = 1.5) -> float:
    """bf16 GFLOP/s of a 2048 x 2048 matmul on all threads, measured now."""
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        a @ b
        count += 1
    return 2 * 2048**3 * count / (time.perf_counter() - began) / 1e9


def interleave(workers: list[Worker], rounds: int, argument: str = "", peaks=None) -> None:
    for number in range(rounds):
        for worker in workers:
            unit = worker.go(argument)
            unit["load_average"] = os.getloadavg()[0]  # 1-minute, just after the unit
            print(
                f"    round {number} {worker.name}{' ' + argument if argument else ''}: "
                f"{unit['seconds']:.2f}s {unit.get('tokens', 0)} tokens, "
                f"load {unit['load_average']:.1f}",
                flush=True,
            )
        if peaks is not None:
            peaks.append(matmul_peak())


def rate(units: list[dict], warmup: int, argument: str | None = None) -> dict:
    """tokens/s and s/unit over the measured units (``argument`` filters generation batches)."""
    chosen = [u for u in units if argument is None or str(u.get("batch")) == argument]
    measured = chosen[warmup:]
    seconds = sum(u["seconds"] for u in measured)
    cpu = sum(u.get("cpu_seconds", 0.0) for u in measured)
    tokens = sum(u.get("tokens", 0) for u in measured)
    flops = sum(u.get("flops", 0.0) for u in measured)
    # Medians over the measured units: one step caught in a load spike moves the mean
    # (a 269 s TRL step among 27-33 s ones here), not these.
    per_unit = [u.get("tokens", 0) / u["seconds"] for u in measured if u["seconds"] > 0]
    loads = [u["load_average"] for u in measured if "load_average" in u]
    return {
        "load_average_range": [min(loads), max(loads)] if loads else None,
        "median_seconds_per_unit": statistics.median(u["seconds"] for u in measured)
        if measured
        else 0.0,
        "median_tokens_per_second": statistics.median(per_unit) if per_unit else 0.0,
        "units": len(measured),
        "seconds_per_unit": seconds / max(1, len(measured)),
        "cpu_seconds_per_unit": cpu / max(1, len(measured)),
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "tokens_per_cpu_second": tokens / cpu if cpu else 0.0,
        "gflops_per_second": flops / seconds / 1e9 if seconds else 0.0,
    }


def median_ratio(mine: dict, theirs: dict) -> float:
    """Ratio of the median per-unit tokens/s (robust to one unit caught in a load spike)."""
    return mine["median_tokens_per_second"] / max(theirs["median_tokens_per_second"], 1e-9)


# -- data ---------------------------------------------------------------------------------


def fitting_rows(count: int, max_length: int) -> list[dict]:
    """HH rows whose prompt + longer reply fit ``max_length`` tokens (so neither side cuts)."""
    from alignkit.data import encode_completion, encode_prompt
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rows = []
    for row in hh_pairs():
        prompt = encode_prompt(tokenizer, row["prompt"])
        longest = max(
            len(encode_completion(tokenizer, row["prompt"], row[side]))
            for side in ("chosen", "rejected")
        )
        if len(prompt) + longest + 8 <= max_length and len(prompt) < max_length // 2:
            rows.append(row)
        if len(rows) == count:
            break
    return rows


def short_prompts(count: int, max_tokens: int) -> list[dict]:
    from alignkit.data import encode_prompt
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    prompts = []
    for row in hh_pairs():
        first_turn = row["prompt"][:1]
        if len(encode_prompt(tokenizer, first_turn)) <= max_tokens:
            prompts.append({"prompt": first_turn})
        if len(prompts) == count:
            break
    return prompts


# -- cases --------------------------------------------------------------------------------


def offline_params(kind: str, args, workdir: Path, rows: list[dict]) -> dict:
    """alignkit's settings for a dpo / reward / sft step on ``rows`` (written to workdir)."""
    ours = {
        "model": MODEL,
        "data": str(write_jsonl(workdir / f"{kind}.jsonl", rows)),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": {"dpo": 5e-6, "reward": 1e-5, "sft": 2e-5}[kind],
        "bf16": "true",
        "eval_fraction": 0.0,
        "seed": 0,
    }
    if kind == "dpo":
        ours["beta"] = 0.1
    return ours


def generation_params(args) -> dict:
    """The sampling settings of the generation case (its 64 short HH prompts)."""
    return {"max_new_tokens": args.gen_tokens, "temperature": 1.0,
            "_prompts": short_prompts(64, 128)}  # fmt: skip


def case_offline(kind: str, args, workdir: Path, results: dict) -> None:
    """dpo / reward: alignkit against each TRL configuration in turn; sft: alignkit alone."""
    from alignkit.models import resolve_model

    model_dir = resolve_model(MODEL)
    steps = args.warmup + args.steps
    rows = fitting_rows(steps * args.batch_size, args.max_length)
    ours = offline_params(kind, args, workdir, rows)
    lr = ours["lr"]
    if kind == "sft":
        sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        ours["data"] = str(write_jsonl(workdir / "sft.jsonl", sft_rows))
    peer_base = {
        "model_dir": model_dir,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": lr,
        "bf16": True,
        "beta": 0.1,
        "_rows": rows,
    }
    peers = {
        "dpo": {
            "trl-default": {},
            "trl-precompute-ref": {"precompute_ref_log_probs": True},
        },
        "reward": {"trl-default": {}},
        "sft": {},
    }[kind]
    print(f"[{kind}] {len(rows)} rows, batch {args.batch_size}, max_length {args.max_length}")
    env = alignkit_env()
    ak = start(f"{kind}-alignkit", "alignkit", kind, ours, workdir, sys.executable, env)
    entry = {"rows": len(rows), "batch_size": args.batch_size, "max_length": args.max_length}
    peaks: list[float] = []
    comparisons = {}
    if not peers:
        interleave([ak], steps, peaks=peaks)
    for peer_name, extra in peers.items():
        peer = start(
            f"{kind}-{peer_name}",
            "peer",
            kind,
            {**peer_base, **extra},
            workdir,
            args.peer_python,
            peer_env(args),
        )
        before = len(ak.units)
        interleave([ak, peer], steps, peaks=peaks)
        peer.stop()
        mine = rate(ak.units[before:], args.warmup)
        theirs = rate(peer.units, args.warmup)
        comparisons[peer_name] = {
            "alignkit": mine,
            "peer": theirs,
            "peer_peak_rss_mb": peer.final["peak_rss_mb"],
            "speedup": mine["tokens_per_second"] / max(theirs["tokens_per_second"], 1e-9),
            "speedup_median": median_ratio(mine, theirs),
        }
    ak.stop()
    entry["alignkit_peak_rss_mb"] = ak.final["peak_rss_mb"]
    entry["comparisons"] = comparisons
    entry["matmul_peak_gflops"] = sum(peaks) / len(peaks) if peaks else 0.0
    overall = rate(ak.units, args.warmup)
    entry["alignkit"] = overall
    if kind in ("dpo", "sft") and peaks:
        entry["mfu"] = overall["gflops_per_second"] / entry["matmul_peak_gflops"]
    results[kind] = entry


def rl_params(workdir: Path) -> tuple[dict, dict]:
    """alignkit's and TRL's settings for one GRPO step (group 8, 48 new tokens)."""
    from alignkit.models import resolve_model

    prompts = short_prompts(64, 128)
    data = write_jsonl(workdir / "prompts.jsonl", prompts)
    settings = {
        "samples_per_prompt": 8,
        "prompts_per_step": 1,
        "max_new_tokens": 48,
        "temperature": 1.0,
        "kl_coef": 0.04,
        "lr": 1e-6,
    }
    ours = {
        **settings,
        "algo": "grpo",
        "model": MODEL,
        "data": str(data),
        "reward": "common:length_reward",
        "eval_prompts": 0,
        "bf16": "true",
        "seed": 0,
    }
    peer = {**settings, "model_dir": resolve_model(MODEL), "bf16": True, "_prompts": prompts}
    return ours, peer


def case_rl(args, workdir: Path, results: dict) -> None:
    steps = args.warmup + (args.rl_steps if args.rl_steps is not None else args.steps)
    ours, peer = rl_params(workdir)
    print(f"[rl] GRPO, group 8, 48 new tokens, {len(peer['_prompts'])} prompts")
    ak = start("rl-alignkit", "alignkit", "rl", ours, workdir, sys.executable, alignkit_env())
    trl = start("rl-trl-grpo", "peer", "rl", peer, workdir, args.peer_python, peer_env(args))
    interleave([ak, trl], steps)
    trl.stop()
    ak.stop()
    mine, theirs = rate(ak.units, args.warmup), rate(trl.units, args.warmup)
    results["rl"] = {
        "alignkit": mine,
        "peer": theirs,
        "alignkit_peak_rss_mb": ak.final["peak_rss_mb"],
        "peer_peak_rss_mb": trl.final["peak_rss_mb"],
        "speedup": theirs["seconds_per_unit"] / mine["seconds_per_unit"],
        "speedup_median": theirs["median_seconds_per_unit"]
        / max(mine["median_seconds_per_unit"], 1e-9),
    }


def case_generate(args, workdir: Path, results: dict) -> None:
    from alignkit.models import resolve_model

    sampling = generation_params(args)
    hf = {**sampling, "model_dir": resolve_model(MODEL), "bf16": True}
    print(f"[generate] {args.gen_tokens} new tokens, temperature 1, batch 1 and 32")
    ak = start("gen-alignkit", "alignkit", "generate", sampling, workdir, sys.executable,
               alignkit_env())  # fmt: skip
    peers = [
        start(
            "gen-hf-bf16-weights",
            "peer",
            "generate",
            {**hf, "bf16_weights": True},
            workdir,
            args.peer_python,
            peer_env(args),
        ),  # fmt: skip
    ]
    everyone = [ak, *peers]
    rounds = args.warmup + args.steps
    for batch in ("1", "32"):
        interleave(everyone, rounds, argument=batch)
    for worker in everyone:
        worker.stop()
    entry = {}
    for batch in ("1", "32"):
        mine = rate(ak.units, args.warmup, batch)
        theirs = {p.name: rate(p.units, args.warmup, batch) for p in peers}
        best = max(theirs, key=lambda name: theirs[name]["tokens_per_second"])
        entry[f"batch{batch}"] = {
            "alignkit": mine,
            "peers": theirs,
            "best_peer": best,
            "speedup": mine["tokens_per_second"] / max(theirs[best]["tokens_per_second"], 1e-9),
            "speedup_median": median_ratio(mine, theirs[best]),
        }
    entry["alignkit_peak_rss_mb"] = ak.final["peak_rss_mb"]
    entry["peer_peak_rss_mb"] = {p.name: p.final["peak_rss_mb"] for p in peers}
    results["generate"] = entry


# --variant of allocator mode: alignkit's runtime environment -> the environment compared
ALLOCATOR_VARIANTS = {
    "glibc": lambda env: {**env, "LD_PRELOAD": os.environ.get("LD_PRELOAD", "")},
    # tcmalloc maps its memory instead of growing the heap, which huge pages then back
    "skip-sbrk": lambda env: {**env, "TCMALLOC_SKIP_SBRK": "true"},
}


def allocator_ab(args, workdir: Path) -> dict:
    """alignkit in its runtime environment against a variant of it, steps interleaved.

    Each case (``--cases``: dpo, rl, generate; default dpo) runs two alignkit workers,
    one per environment, one step of each in turn.
    """
    from alignkit.models import resolve_model  # noqa: F401  (model converted before timing)

    steps = args.warmup + args.steps
    cases = args.cases.split(",") if args.cases != CASES else ["dpo"]
    ours = alignkit_env()
    theirs = ALLOCATOR_VARIANTS[args.variant](ours)
    changed = {k: v for k, v in theirs.items() if ours.get(k) != v}
    print(f"[allocator] {args.variant} ({changed}) against LD_PRELOAD={ours.get('LD_PRELOAD')}")
    result: dict = {"variant": args.variant, "changed": changed}
    for case in cases:
        if case == "dpo":
            rows = fitting_rows(steps * args.batch_size, args.max_length)
            params = offline_params("dpo", args, workdir, rows)
        elif case == "rl":
            params, _ = rl_params(workdir)
        elif case == "generate":
            params = generation_params(args)
        else:
            raise SystemExit(f"allocator: unknown case {case}")
        workers = [
            start(f"{case}-{name}", "alignkit", case, params, workdir, sys.executable, env)
            for name, env in (("runtime", ours), (args.variant, theirs))
        ]
        batches = ("1", "32") if case == "generate" else ("",)
        for batch in batches:
            interleave(workers, steps, argument=batch)
        for worker in workers:
            worker.stop()
            rates = {f"batch{b}" if b else "rate": rate(worker.units, args.warmup, b or None)
                     for b in batches}  # fmt: skip
            result[worker.name] = {**rates, "peak_rss_mb": worker.final["peak_rss_mb"]}
            print(f"  {worker.name}: {result[worker.name]}", flush=True)
    return result


# -- report -------------------------------------------------------------------------------


def machine() -> dict:
    info = {"python": platform.python_version(), "nproc": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
                info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = info.get("Flags", "").split()
    info["Flags"] = " ".join(f for f in flags if "avx512" in f or "amx" in f or f == "avx2")
    info["load_average"] = os.getloadavg()
    import torch

    info["torch"] = torch.__version__
    return info


def table(results: dict) -> str:
    lines = [
        "| case | alignkit | peer (best config) | ratio | median-step ratio "
        "| peak RSS alignkit / peer (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("dpo", "reward"):
        if kind not in results:
            continue
        entry = results[kind]
        comps = entry["comparisons"]
        best = max(comps, key=lambda n: comps[n]["peer"]["tokens_per_second"])
        comp = comps[best]
        lowest_peer_rss = min(c["peer_peak_rss_mb"] for c in comps.values())
        lines.append(
            f"| {kind} (batch {entry['batch_size']} pairs, max_length {entry['max_length']}) "
            f"| {comp['alignkit']['tokens_per_second']:.0f} tok/s "
            f"| {comp['peer']['tokens_per_second']:.0f} tok/s ({best}) "
            f"| **{comp['speedup']:.2f}x** | {comp['speedup_median']:.2f}x "
            f"| {entry['alignkit_peak_rss_mb']:.0f} / {comp['peer_peak_rss_mb']:.0f} "
            f"(lowest peer {lowest_peer_rss:.0f}) |"
        )
        for name, other in comps.items():
            if name != best:
                lines.append(
                    f"| {kind}: vs {name} | {other['alignkit']['tokens_per_second']:.0f} tok/s "
                    f"| {other['peer']['tokens_per_second']:.0f} tok/s "
                    f"| {other['speedup']:.2f}x | {other['speedup_median']:.2f}x "
                    f"| {entry['alignkit_peak_rss_mb']:.0f} / {other['peer_peak_rss_mb']:.0f} |"
                )
    if "rl" in results:
        entry = results["rl"]
        lines.append(
            f"| online GRPO step (1 prompt x 8, 48 tokens) "
            f"| {entry['alignkit']['seconds_per_unit']:.2f} s/step "
            f"| {entry['peer']['seconds_per_unit']:.2f} s/step (TRL GRPOTrainer) "
            f"| **{entry['speedup']:.2f}x** | {entry['speedup_median']:.2f}x "
            f"| {entry['alignkit_peak_rss_mb']:.0f} / {entry['peer_peak_rss_mb']:.0f} |"
        )
    if "generate" in results:
        entry = results["generate"]
        for batch in ("1", "32"):
            part = entry[f"batch{batch}"]
            best = part["best_peer"]
            lines.append(
                f"| generate batch {batch} ({results['args']['gen_tokens']} new tokens) "
                f"| {part['alignkit']['tokens_per_second']:.0f} tok/s "
                f"| {part['peers'][best]['tokens_per_second']:.0f} tok/s ({best}) "
                f"| **{part['speedup']:.2f}x** | {part['speedup_median']:.2f}x "
                f"| {entry['alignkit_peak_rss_mb']:.0f} / {entry['peer_peak_rss_mb'][best]:.0f} |"
            )
    for kind in ("dpo", "sft"):
        if kind in results and "mfu" in results[kind]:
            entry = results[kind]
            lines.append(
                f"| MFU {kind} step | {entry['alignkit']['gflops_per_second']:.0f} GFLOP/s "
                f"| bf16 matmul peak {entry['matmul_peak_gflops']:.0f} GFLOP/s (same run) "
                f"| **{100 * entry['mfu']:.0f}%** | | |"
            )
    return "\n".join(lines)


CASES = "generate,dpo,reward,rl,sft"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", nargs="?", default="compare", choices=["compare", "memory", "allocator"]
    )
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per worker")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--rl-steps", type=int, default=None, help="measured GRPO steps")
    parser.add_argument("--peer-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"))
    parser.add_argument(
        "--peer-env",
        choices=["default", "alignkit"],
        default="default",
        help="run the peer as users do (default) or in alignkit's runtime environment",
    )
    parser.add_argument(
        "--variant",
        choices=sorted(ALLOCATOR_VARIANTS),
        default="glibc",
        help="allocator: the environment alignkit's is compared with",
    )
    parser.add_argument(
        "--check-largest",
        action="store_true",
        help="memory: also run each recipe at its estimated largest batch for 16 GB",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict = {"machine": machine(), "args": vars(args), "workdir": str(workdir)}
    results["omp_wait_policy"] = {
        "alignkit": alignkit_env().get("OMP_WAIT_POLICY", "default"),
        "peer": peer_env(args).get("OMP_WAIT_POLICY", "default"),
    }
    print(
        f"logs in {workdir}; load average {os.getloadavg()}; "
        f"OMP_WAIT_POLICY {results['omp_wait_policy']}",
        flush=True,
    )
    if args.mode == "memory":
        from memory import RECIPES, memory_table

        # (--cases names the recipes here when given; the default list is the compare one's)
        cases = args.cases.split(",") if args.cases != CASES else RECIPES
        results["memory"] = memory_table(
            workdir, alignkit_env(), largest=args.check_largest, recipes=cases
        )
    elif args.mode == "allocator":
        results["allocator"] = allocator_ab(args, workdir)
    else:
        for case in args.cases.split(","):
            began = time.time()
            runner = {"rl": case_rl, "generate": case_generate}.get(case)
            try:
                if case in ("dpo", "reward", "sft"):
                    case_offline(case, args, workdir, results)
                elif runner is not None:
                    runner(args, workdir, results)
                else:
                    raise SystemExit(f"unknown case {case}")
            except (RuntimeError, OSError) as err:  # a worker died: note it, go on
                print(f"  {case} failed: {err}", flush=True)
                results.setdefault("failed", {})[case] = str(err)
            print(f"  ({case}: {time.time() - began:.0f}s)", flush=True)
            (out / f"{stamp}.json").write_text(json.dumps(results, indent=2))
        results["load_average_end"] = os.getloadavg()
        print(table(results))
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / f'{stamp}.json'}")


if __name__ == "__main__":
    main()
