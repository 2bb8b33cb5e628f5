"""Built-in tasks: a fixed prompt set (train / eval split) and a gold judge no training sees.

A :class:`Task` is data plus a judge. The prompts live in JSONL files shipped in
``alignkit/tasks/data/`` (one ``{"prompt": ..., "split": "train" | "eval"}`` per
line); the judge is a function ``gold(prompts, completions) -> list[float]``.
Built-ins: ``sentiment`` (the default, VADER on continued movie reviews) and
``harmless`` (decline harmful requests, answer benign ones on topic).
:func:`register_task` adds a user task from a prompts file and a ``module:function``
judge.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import InputError
from alignkit.jsonl import jsonl_lines

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_TASK = "sentiment"

Prompt = str | list[dict[str, str]]
GoldJudge = Callable[[Sequence[Prompt], Sequence[str]], list[float]]

_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Task:
    """A prompt set with a gold judge. ``chat``: prompts are sent as one user turn."""

    name: str
    train_prompts: list[str]
    eval_prompts: list[str]
    gold: GoldJudge
    chat: bool
    description: str = ""

    def gold_on(self, device: Any) -> GoldJudge:
        """The gold judge, its own models (the harmless task's encoder) on ``device``."""
        return judge_on(self.gold, device)

    def prompts(self, split: str = "train") -> list[Prompt]:
        """The split's prompts as the policy sees them: strings, or one-turn chats if ``chat``."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        texts = self.train_prompts if split == "train" else self.eval_prompts
        if self.chat:
            return [[{"role": "user", "content": text}] for text in texts]
        return list(texts)


def prompt_text(prompt: Prompt) -> str:
    """The request a prompt makes: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content", "")
    return prompt[-1].get("content", "") if prompt else ""


def import_function(spec: str, field: str, source: str = "config") -> Callable[..., Any]:
    """``package.module:function`` -> the function; an :class:`InputError` naming ``field`` otherwise."""
    if not _FUNCTION_SPEC.match(spec):
        raise InputError(f"expected module:function, got {spec!r}", path=source, field=field)
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(
            f"cannot import module {module_name!r} ({err})", path=source, field=field
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(
            f"module {module_name!r} has no function {function_name!r}", path=source, field=field
        )
    return function


def read_prompts_file(path: str | Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows, train prompts, eval prompts) of a task's JSONL file.

    Each line is an object with a non-empty string ``prompt`` and an optional
    ``split`` (``train`` or ``eval``). Without any ``split`` column, every fifth
    prompt (index 4, 9, ...) is held out for eval.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("prompts file not found", path=str(path))
    rows: list[dict[str, Any]] = []
    for line_number, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"invalid JSON ({err.msg})", path=str(path), line=line_number
            ) from None
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", path=str(path), line=line_number)
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(
                "must be a non-empty string", path=str(path), line=line_number, field="prompt"
            )
        split = row.get("split")
        if split not in (None, "train", "eval"):
            raise InputError(
                f"must be 'train' or 'eval', got {split!r}",
                path=str(path),
                line=line_number,
                field="split",
            )
        rows.append(row)
    if not rows:
        raise InputError("no prompts", path=str(path))
    if all(row.get("split") is None for row in rows):
        for index, row in enumerate(rows):
            row["split"] = "eval" if index % 5 == 4 else "train"
    train = [row["prompt"] for row in rows if row.get("split", "train") == "train"]
    evaluation = [row["prompt"] for row in rows if row.get("split") == "eval"]
    return rows, train, evaluation


# name -> (data file, judge, chat, description)
_BUILTIN: dict[str, tuple[str, str, bool, str]] = {
    "sentiment": (
        "sentiment.jsonl",
        "alignkit.tasks.sentiment:gold",
        True,
        "continue a movie review's opening; gold = VADER compound sentiment of the reply",
    ),
    "harmless": (
        "harmless.jsonl",
        "alignkit.tasks.harmless:gold",
        True,
        "decline harmful requests, answer benign ones on topic; gold in [-1, 1]",
    ),
}
_REGISTERED: dict[str, Task] = {}


def register_task(
    name: str,
    prompts_file: str | Path,
    judge: str | GoldJudge,
    chat: bool = False,
    description: str = "",
) -> Task:
    """Add (or replace) a user task: a prompts JSONL file and a ``module:function`` judge."""
    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise InputError(f"task names are letters, digits, - and _, got {name!r}", field="task")
    if name in _BUILTIN:
        raise InputError(f"{name!r} is a built-in task and cannot be replaced", field="task")
    gold = import_function(judge, field="judge") if isinstance(judge, str) else judge
    _, train, evaluation = read_prompts_file(prompts_file)
    task = Task(name, train, evaluation, gold, chat, description)
    _REGISTERED[name] = task
    return task


def judge_on(judge: GoldJudge, device: Any) -> GoldJudge:
    """``judge`` with its ``device`` argument bound, when it takes one (a judge that runs
    a model, such as the harmless task's); any other judge as it is."""
    try:
        takes_device = "device" in inspect.signature(judge).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        takes_device = False
    return functools.partial(judge, device=device) if takes_device else judge


def task_names() -> list[str]:
    """Every task :func:`get_task` knows: built-ins first, then registered ones."""
    return list(_BUILTIN) + [name for name in _REGISTERED if name not in _BUILTIN]


def get_task(name: str) -> Task:
    """A built-in or registered task by name; an :class:`InputError` (field ``task``) otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise InputError(f"unknown task {name!r} (known: {', '.join(task_names())})", field="task")
    filename, judge, chat, description = _BUILTIN[name]
    _, train, evaluation = read_prompts_file(DATA_DIR / filename)
    task = Task(name, train, evaluation, import_function(judge, "task"), chat, description)
    _REGISTERED[name] = task
    return task
