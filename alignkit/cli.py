"""The ``alignkit`` command: one subcommand per recipe or tool.

A command lives in its own module, imported only when it runs. A module is one of
two kinds:

* a **recipe**: it defines ``Config`` (a dataclass) and ``run(config, overwrite, resume)``;
  the CLI gives it ``--config FILE.yaml``, ``key=value`` overrides, ``--overwrite``
  and ``--resume``, and ``--help`` lists every key with its default;
* a **tool**: it defines ``add_arguments(parser)`` and ``main(args) -> int``.

Either kind has a one-line module docstring, shown in ``alignkit --help``.
Bad input anywhere raises :class:`~alignkit.errors.InputError`, printed as one line
with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType

from alignkit.errors import InputError, TrainingDiverged

COMMANDS: dict[str, str] = {
    "sft": "alignkit.recipes.sft",
    "reward": "alignkit.recipes.reward",
    "dpo": "alignkit.recipes.dpo",
    "sample": "alignkit.recipes.sample",
    "ppo": "alignkit.recipes.ppo",
    "rl": "alignkit.recipes.reinforce",
    "bon": "alignkit.recipes.best_of_n",
    "rsft": "alignkit.recipes.rejection_sampling",
    "online-dpo": "alignkit.recipes.online_dpo",
    "dm": "alignkit.recipes.distribution",
    "label": "alignkit.feedback.cli",
    "judge": "alignkit.eval.judge_cli",
    "eval": "alignkit.eval.cli",
    "serve": "alignkit.serve",
    "demo": "alignkit.demo",
}


# A malloc that keeps freed pages: glibc hands every large tensor back to the kernel
# and faults it in again on the next step, which measured 3-5x slower per byte for the
# allocation-heavy training step here (docs/benchmarks.md). The first library found is
# preloaded by re-executing the command once; ALIGNKIT_ALLOCATOR=system turns it off,
# ALIGNKIT_ALLOCATOR=/path/lib.so picks another.
_ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
_LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_REEXEC_MARK = "ALIGNKIT_RUNTIME"


def find_allocator(environ: dict[str, str]) -> str | None:
    """Path of the malloc library to preload, or None (none installed, or turned off)."""
    choice = environ.get("ALIGNKIT_ALLOCATOR", "auto")
    if choice == "system":
        return None
    if choice != "auto":
        return choice if os.path.isfile(choice) else None
    for name in _ALLOCATORS:
        for folder in _LIBRARY_DIRS:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


# Other work may use this share of the machine's CPU time before alignkit's OpenMP
# threads are made to sleep at barriers (runtime_env).
_BUSY_SHARE = 0.25


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy(sample_seconds: float = 0.2) -> bool:
    """Whether other work is using the CPUs now.

    Busy when over :data:`_BUSY_SHARE` of all CPU time in a short sample of /proc/stat
    went to processes other than idle; without /proc/stat, when the 1-minute load
    average is at least half the CPU count. (The load average alone would lag: it stays
    high for a minute after alignkit's own previous command.)
    """
    before = _cpu_ticks()
    if before is None:
        try:
            return os.getloadavg()[0] >= 0.5 * (os.cpu_count() or 1)
        except OSError:  # pragma: no cover - no load average on this platform
            return False
    time.sleep(sample_seconds)
    after = _cpu_ticks()
    total = after[1] - before[1] if after else 0
    return total > 0 and (after[0] - before[0]) / total > _BUSY_SHARE


def runtime_env(
    environ: dict[str, str], busy: Callable[[], bool] = machine_busy
) -> dict[str, str] | None:
    """The environment alignkit runs in, or None when ``environ`` needs no change.

    Adds the allocator to ``LD_PRELOAD`` (tcmalloc's large-allocation warnings off).
    tcmalloc is told to map its memory rather than grow the heap with ``sbrk``
    (``TCMALLOC_SKIP_SBRK``): Linux does not collapse that heap into huge pages
    (:func:`alignkit.hugepages.back_with_huge_pages`), so the weights a decode step
    streams stayed on 4 KB pages. Measured with steps interleaved (docs/benchmarks.md):
    sampling at batch 1 +5%, batch 32, DPO and GRPO steps unchanged.
    On a machine other work is using (``busy()``) OpenMP threads are made to sleep at
    barriers (``OMP_WAIT_POLICY=PASSIVE``): a spinning thread burns the time slice its
    partner needs. On an idle machine OpenMP's default (spin briefly, then sleep) is
    kept: waking a sleeping thread costs more than the short ops of a decode step take.
    Measured here with 2 threads (docs/benchmarks.md): idle, sampling at batch 1 ran
    21 tok/s passive against 41 with the default, batch 32 168 against 234, DPO steps
    15-30% shorter; beside two busy processes, passive gave 24.5 and 132 tok/s against
    the default's 16.8 and 87 (and 10-50x per training step at load 13).
    A value the user set wins.
    """
    if environ.get(_REEXEC_MARK):
        return None
    env = dict(environ)
    if "OMP_WAIT_POLICY" not in environ and busy():
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    library = find_allocator(environ)
    preload = environ.get("LD_PRELOAD", "")
    if library is not None and os.path.basename(library) not in preload:
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
        if "tcmalloc" in os.path.basename(library):
            env.setdefault("TCMALLOC_SKIP_SBRK", "true")
    if env == environ:
        return None
    env[_REEXEC_MARK] = "1"
    return env


def _reexec_in_runtime_env() -> None:
    """Run this same command again, once, in :func:`runtime_env` (before torch loads)."""
    env = runtime_env(dict(os.environ))
    if env is None or not getattr(sys, "orig_argv", None):
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # pragma: no cover - carry on with the system allocator
        pass


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as err:
        if err.name and COMMANDS[name].startswith(err.name):
            return None
        raise


def _summary(module: ModuleType | None) -> str:
    if module is None or not module.__doc__:
        return "(not available in this build)"
    return module.__doc__.strip().splitlines()[0]


def _recipe_epilog(config_cls: type) -> str:
    from alignkit.config import field_help

    lines = ["keys (set with key=value or in --config FILE.yaml):"]
    for name, text, default in field_help(config_cls):
        lines.append(f"  {name}={default!s:<14} {text}")
    return "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Align language models with human preferences.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        # Import only the command being run (or all of them for the top-level --help).
        module = _load(name) if command in (None, name) else None
        help_text = _summary(module) if command in (None, name) else ""
        kwargs = {"help": help_text, "description": help_text}
        if module is not None and hasattr(module, "Config"):
            p = sub.add_parser(
                name,
                epilog=_recipe_epilog(module.Config),
                formatter_class=argparse.RawDescriptionHelpFormatter,
                **kwargs,
            )
            p.add_argument("--config", metavar="FILE.yaml", help="YAML file of key: value settings")
            p.add_argument(
                "--overwrite", action="store_true", help="replace an existing output_dir"
            )
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from the last checkpoint in output_dir",
            )
            p.add_argument(
                "overrides", nargs="*", metavar="key=value", help="settings that win over the YAML"
            )
        else:
            p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
            if module is not None:
                module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def run(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    if command in COMMANDS and hasattr(_load(command), "Config"):
        # Recipe flags may come anywhere among the key=value pairs.
        flags = [a for a in argv if a in ("--overwrite", "--resume")]
        argv = [a for a in argv if a not in flags]
        position = argv.index(command) + 1
        argv = argv[:position] + flags + argv[position:]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = args.module
    if module is None:
        raise InputError(
            f"command '{args.command}' is not available in this build", path="command line"
        )
    if hasattr(module, "Config"):
        from alignkit.config import load_config

        recipe = args.command.replace("-", "_")
        config = load_config(module.Config, recipe, args.config, args.overrides)
        module.run(config, overwrite=args.overwrite, resume=args.resume)
        return 0
    return int(module.main(args) or 0)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        _reexec_in_runtime_env()
    _quiet_libraries()
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except InputError as err:
        print(f"alignkit: {err}", file=sys.stderr)
        code = 2
    except TrainingDiverged as err:
        print(f"alignkit: {err}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
