"""Checks that a record fits its project: prompts file rows, items and judgments.

Every failure is an :class:`~alignkit.errors.InputError` naming the field, so the
CLI prints one line (``prompts.jsonl:7: field 'completions' ...``) and the web
app shows the same text.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alignkit.errors import InputError
from alignkit.feedback.records import Item, Judgment
from alignkit.jsonl import jsonl_lines

TASK_KINDS = ("pairwise", "ranking", "thumbs", "likert")
SOURCES = ("human", "ai", "simulated")
CHAT_ROLES = ("system", "user", "assistant")
LIKERT_RANGE = (1, 7)


def check_project_shape(kind: str, num_completions: int, overlap: int) -> None:
    """Raise when a task type cannot work with that many completions or that overlap."""
    if kind not in TASK_KINDS:
        raise InputError(f"must be one of {', '.join(TASK_KINDS)} (got {kind!r})", field="kind")
    if kind == "pairwise" and num_completions != 2:
        raise InputError(
            f"pairwise needs exactly 2 completions (got {num_completions})", field="completions"
        )
    if kind == "ranking" and num_completions < 2:
        raise InputError(
            f"ranking needs at least 2 completions (got {num_completions})", field="completions"
        )
    if num_completions < 1:
        raise InputError("needs at least 1 completion", field="completions")
    if not 1 <= overlap <= 100:
        raise InputError(f"must be between 1 and 100 (got {overlap})", field="overlap")


def check_prompt(prompt: Any, *, path: str | None = None, line: int | None = None) -> None:
    """A prompt is a non-empty string or a non-empty list of ``{role, content}`` messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("is empty", path=path, line=line, field="prompt")
        return
    if not isinstance(prompt, list) or not prompt:
        raise InputError(
            "must be a string or a list of chat messages", path=path, line=line, field="prompt"
        )
    for index, message in enumerate(prompt):
        where = f"prompt[{index}]"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise InputError(
                "must be an object with keys role and content", path=path, line=line, field=where
            )
        if message.get("role") not in CHAT_ROLES:
            raise InputError(
                f"role must be one of {', '.join(CHAT_ROLES)}", path=path, line=line, field=where
            )
        if not isinstance(message.get("content"), str):
            raise InputError("content must be a string", path=path, line=line, field=where)


def item_key(prompt: Any, completions: list[str] | tuple[str, ...]) -> str:
    """A stable id for rows without one: a hash of prompt and completions."""
    payload = json.dumps([prompt, list(completions)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def read_prompts_file(path: str | Path, num_completions: int | None = None) -> list[Item]:
    """Items from ``alignkit sample`` output: JSONL rows ``{"prompt", "completions", ["id"], ...}``.

    Extra keys go into ``Item.metadata``. Every row must have ``num_completions``
    completions (without it: as many as the first row).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror})", path=str(path)) from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", path=str(path)) from None
    return parse_prompt_lines(jsonl_lines(text), str(path), num_completions)


def parse_prompt_lines(
    lines: Iterable[str], path: str, num_completions: int | None = None
) -> list[Item]:
    """Items from JSONL lines (``path`` names them in errors); blank lines are skipped.

    Without ``num_completions`` the first row sets how many every row must have.
    """
    items = []
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            items.append(_parse_prompt_row(line, path, line_number, num_completions))
            num_completions = len(items[0].completions)
    if not items:
        raise InputError("has no rows", path=path)
    return items


def _parse_prompt_row(line: str, path: str, line_number: int, num_completions: int | None) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"is not valid JSON ({err.msg})", path=path, line=line_number) from None
    if not isinstance(row, dict):
        raise InputError("must be a JSON object", path=path, line=line_number)
    for required in ("prompt", "completions"):
        if required not in row:
            raise InputError("is missing", path=path, line=line_number, field=required)
    check_prompt(row["prompt"], path=path, line=line_number)
    completions = row["completions"]
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise InputError(
            "must be a list of strings", path=path, line=line_number, field="completions"
        )
    if num_completions is not None and len(completions) != num_completions:
        raise InputError(
            f"must have {num_completions} completions for this project (got {len(completions)})",
            path=path,
            line=line_number,
            field="completions",
        )
    if not completions:
        raise InputError("is empty", path=path, line=line_number, field="completions")
    key = row.get("id", item_key(row["prompt"], completions))
    if not isinstance(key, (str, int)) or isinstance(key, bool) or not str(key).strip():
        raise InputError(
            "must be a non-empty string or integer", path=path, line=line_number, field="id"
        )
    if len(str(key)) > 128:
        raise InputError("is longer than 128 characters", path=path, line=line_number, field="id")
    metadata = {k: v for k, v in row.items() if k not in ("id", "prompt", "completions")}
    return Item(
        item_id=str(key), prompt=row["prompt"], completions=tuple(completions), metadata=metadata
    )


def check_item(item: Item, num_completions: int) -> None:
    """Raise when an item does not fit a project with ``num_completions`` completions."""
    where = f"item {item.item_id!r}"
    if not isinstance(item.item_id, str) or not item.item_id or len(item.item_id) > 128:
        raise InputError("must be a string of 1 to 128 characters", path=where, field="item_id")
    check_prompt(item.prompt, path=where)
    if len(item.completions) != num_completions or not all(
        isinstance(c, str) for c in item.completions
    ):
        raise InputError(
            f"must be {num_completions} strings (got {len(item.completions)})",
            path=where,
            field="completions",
        )


def _check_partition(ranking: Any, size: int) -> None:
    if not isinstance(ranking, (list, tuple)) or not ranking:
        raise InputError("must be a non-empty list of tie groups", field="ranking")
    seen: list[int] = []
    for group in ranking:
        if not isinstance(group, (list, tuple)) or not group:
            raise InputError("tie groups must be non-empty lists of indices", field="ranking")
        seen.extend(group)
    if sorted(seen) != list(range(size)) or not all(isinstance(i, int) for i in seen):
        raise InputError(f"must place each completion 0..{size - 1} exactly once", field="ranking")


def check_judgment(judgment: Judgment, kind: str, num_completions: int) -> None:
    """Raise when ``judgment`` is not a valid verdict for this task type and K."""
    if judgment.kind != kind:
        raise InputError(f"must be {kind!r} for this project (got {judgment.kind!r})", field="kind")
    if judgment.source not in SOURCES:
        raise InputError(f"must be one of {', '.join(SOURCES)}", field="source")
    if (
        not (isinstance(judgment.seconds, (int, float)) and math.isfinite(judgment.seconds))
        or judgment.seconds < 0
    ):
        raise InputError("must be a finite number >= 0", field="seconds")
    probability = judgment.probability
    if probability is not None and not (
        isinstance(probability, (int, float)) and 0.0 <= probability <= 1.0
    ):
        raise InputError("must be between 0 and 1", field="probability")
    if judgment.display_order and sorted(judgment.display_order) != list(range(num_completions)):
        raise InputError(
            f"must be a permutation of 0..{num_completions - 1}", field="display_order"
        )
    if kind in ("pairwise", "ranking"):
        if judgment.ratings is not None:
            raise InputError(f"must be empty for {kind} judgments", field="ratings")
        _check_partition(judgment.ranking, num_completions)
        tie = len(judgment.ranking) == 1
        if judgment.both_bad and not (kind == "pairwise" and tie):
            raise InputError("is only allowed on a pairwise tie", field="both_bad")
        return
    if judgment.ranking is not None or judgment.both_bad:
        raise InputError(f"{kind} judgments carry ratings only", field="ranking")
    ratings = judgment.ratings
    if not isinstance(ratings, dict) or sorted(ratings) != list(range(num_completions)):
        raise InputError(f"must rate every completion 0..{num_completions - 1}", field="ratings")
    for value in ratings.values():
        if kind == "thumbs" and value not in (0, 1):
            raise InputError("thumbs ratings are 0.0 (down) or 1.0 (up)", field="ratings")
        low, high = LIKERT_RANGE
        if kind == "likert" and (value != int(value) or not low <= value <= high):
            raise InputError(f"likert ratings are whole numbers {low}..{high}", field="ratings")
