"""Reading rows from files or datasets, detecting their format, and turning them into examples.

Sources: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of objects), ``.parquet``,
``.csv``, a local dataset directory, or a dataset id passed to
``datasets.load_dataset``. Every row keeps its source and 1-based line (JSONL) or
row number (everything else), so a bad value is reported as
``prefs.jsonl:17: field 'chosen' is empty``.

Formats (detected from the first row's columns unless ``format=`` is given):

- SFT: ``messages`` | ``prompt_completion`` | ``alpaca``
- preferences: ``preference`` (prompt/chosen/rejected, or conversational chosen/rejected
  with an implicit shared prompt; optional ``margin``) | ``ranking`` | ``hh`` |
  ``summarize`` | ``ultrafeedback``
- unpaired: ``unpaired`` (prompt/completion/label, as KTO uses)
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alignkit.data.adapters import (
    preference_from_hh,
    preference_from_summarize,
    preference_from_ultrafeedback,
    split_shared_prompt,
)
from alignkit.data.examples import PreferenceExample, Row, SFTExample, UnpairedExample
from alignkit.data.validation import (
    boolean,
    chat_messages,
    check_distinct,
    completion_value,
    is_blank,
    kind_of,
    number,
    optional_number,
    prompt_value,
    require,
    row_error,
    text,
)
from alignkit.errors import InputError
from alignkit.jsonl import jsonl_lines

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")

Example = TypeVar("Example", SFTExample, PreferenceExample, UnpairedExample)


# 1. reading ---------------------------------------------------------------------------


def read_rows(source: str, split: str | None = None) -> list[Row]:
    """All rows of ``source`` as :class:`Row` objects; raises :class:`InputError` on unreadable input.

    ``split`` selects the split of a dataset directory or id (default ``train``) and is
    ignored for single files.
    """
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_file(path, source)
    elif path.is_dir():
        rows = _read_dataset(source, split, local_dir=path)
    elif source.endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~")):
        raise InputError("file not found", path=source)
    else:
        rows = _read_dataset(source, split, local_dir=None)
    if not rows:
        raise InputError("contains no rows", path=source)
    return rows


def _read_file(path: Path, source: str) -> list[Row]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, source)
    if name.endswith(".json"):
        return _read_json(path, source)
    if name.endswith(".parquet"):
        return _read_parquet(path, source)
    if name.endswith(".csv"):
        return _read_csv(path, source)
    raise InputError(f"unsupported file type (use one of {', '.join(FILE_SUFFIXES)})", path=source)


def _read_text(path: Path, source: str) -> str:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", path=source) from None
    except (OSError, EOFError) as err:
        raise InputError(f"cannot read ({err})", path=source) from None


def _object_row(value: Any, source: str, line: int) -> Row:
    if not isinstance(value, dict):
        raise InputError(
            f"each row must be a JSON object, got {kind_of(value)}", path=source, line=line
        )
    return Row(value, source, line)


def _read_jsonl(path: Path, source: str) -> list[Row]:
    rows = []
    for line_number, line in enumerate(jsonl_lines(_read_text(path, source)), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"invalid JSON ({err.msg} at column {err.colno})", path=source, line=line_number
            ) from None
        rows.append(_object_row(value, source, line_number))
    return rows


def _read_json(path: Path, source: str) -> list[Row]:
    """A JSON list of objects; JSON Lines saved under a ``.json`` name is read as JSONL."""
    content = _read_text(path, source)
    try:
        value = json.loads(content)
    except json.JSONDecodeError as err:
        if content.lstrip().startswith("{"):
            return _read_jsonl(path, source)
        raise InputError(
            f"invalid JSON ({err.msg} at column {err.colno})", path=source, line=err.lineno
        ) from None
    if isinstance(value, dict):  # one JSON Lines row
        return [Row(value, source, 1)]
    if not isinstance(value, list):
        raise InputError(f"must hold a list of JSON objects, got {kind_of(value)}", path=source)
    return [_object_row(item, source, index + 1) for index, item in enumerate(value)]


def _read_parquet(path: Path, source: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read parquet ({str(err).splitlines()[0]})", path=source) from None
    return [Row(record, source, index + 1) for index, record in enumerate(records)]


def _read_csv(path: Path, source: str) -> list[Row]:
    """CSV holds standard (string) data only; a blank cell reads as empty."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise InputError(f"cannot read CSV ({str(err).splitlines()[0]})", path=source) from None
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [Row(_native(record), source, index + 1) for index, record in enumerate(records)]


def _native(record: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars (``numpy.bool_``, ``numpy.int64``) -> Python bool/int/float."""
    return {
        key: value.item() if hasattr(value, "item") and not isinstance(value, str) else value
        for key, value in record.items()
    }


def _read_dataset(source: str, split: str | None, local_dir: Path | None) -> list[Row]:
    """A dataset directory (``save_to_disk`` output or data files) or a dataset id."""
    import datasets

    split = split or "train"
    try:
        if local_dir is not None and (
            (local_dir / "dataset_dict.json").is_file() or (local_dir / "state.json").is_file()
        ):
            dataset = datasets.load_from_disk(str(local_dir))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise InputError(
                        f"has no split {split!r} (splits: {', '.join(dataset)})", path=source
                    )
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(source, split=split)
    except InputError:
        raise
    except Exception as err:  # datasets raises many types; the user needs one line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load dataset ({message})", path=source) from None
    return [Row(record, source, index + 1) for index, record in enumerate(dataset)]


# 2. one row -> examples, per format ------------------------------------------------------


def sft_from_messages(row: Row) -> list[SFTExample]:
    """``messages``: the prompt is every turn before the last assistant turn, which is the completion."""
    messages = chat_messages(row, "messages", require(row, "messages"))
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise row_error(row, "messages", "has no assistant turn")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last != len(messages) - 1:
        raise row_error(row, "messages", f"must end with an assistant turn, got {roles[-1]!r} last")
    if last == 0:
        raise row_error(row, "messages", "has no turn before the last assistant turn")
    if not messages[last]["content"].strip():
        raise row_error(row, f"messages[{last}].content", "is empty")
    return [SFTExample(messages[:last], messages[last:], row.source, row.line)]


def sft_from_prompt_completion(row: Row) -> list[SFTExample]:
    """``prompt`` + ``completion``, both strings or both chat messages."""
    prompt = prompt_value(row, "prompt", require(row, "prompt"))
    completion = completion_value(row, "completion", require(row, "completion"), prompt)
    return [SFTExample(prompt, completion, row.source, row.line)]


def sft_from_alpaca(row: Row) -> list[SFTExample]:
    """``instruction`` (+ optional ``input``) -> ``output``, as one user turn and one assistant turn.

    The chat template of the model being trained renders it, as for any conversational data.
    """
    instruction = text(row, "instruction", require(row, "instruction")).strip()
    extra_input = row.record.get("input")
    if not is_blank(extra_input):
        instruction = f"{instruction}\n\n{text(row, 'input', extra_input).strip()}"
    output = text(row, "output", require(row, "output"))
    prompt = [{"role": "user", "content": instruction}]
    return [SFTExample(prompt, [{"role": "assistant", "content": output}], row.source, row.line)]


def preference_from_trl(row: Row) -> list[PreferenceExample]:
    """TRL preference rows: explicit ``prompt``, or conversational chosen/rejected sharing a prefix."""
    if "prompt" in row.record:
        prompt = prompt_value(row, "prompt", require(row, "prompt"))
        chosen = completion_value(row, "chosen", require(row, "chosen"), prompt)
        rejected = completion_value(row, "rejected", require(row, "rejected"), prompt)
    else:
        chosen_value = require(row, "chosen")
        if isinstance(chosen_value, str):
            raise row_error(row, "prompt", "is missing")
        chosen_full = chat_messages(row, "chosen", chosen_value)
        rejected_full = chat_messages(row, "rejected", require(row, "rejected"))
        prompt, chosen, rejected = split_shared_prompt(row, chosen_full, rejected_full)
    check_distinct(row, "chosen", chosen, "rejected", rejected)
    margin = optional_number(row, "margin")
    return [PreferenceExample(prompt, chosen, rejected, margin, row.source, row.line)]


def preferences_from_ranking(row: Row) -> list[PreferenceExample]:
    """``prompt`` + ``completions`` + ``ranks`` (1 = best): every untied pair, margin = rank gap.

    K completions give C(K, 2) pairs minus ties, in (i, j) order with i < j.
    """
    prompt = prompt_value(row, "prompt", require(row, "prompt"))
    raw_completions = require(row, "completions")
    if not isinstance(raw_completions, (list, tuple)):
        raise row_error(
            row, "completions", f"must be a list of completions, got {kind_of(raw_completions)}"
        )
    if len(raw_completions) < 2:
        raise row_error(
            row, "completions", f"must hold at least 2 completions, got {len(raw_completions)}"
        )
    completions = [
        completion_value(row, f"completions[{index}]", value, prompt)
        for index, value in enumerate(raw_completions)
    ]
    raw_ranks = require(row, "ranks")
    if not isinstance(raw_ranks, (list, tuple)):
        raise row_error(row, "ranks", f"must be a list of numbers, got {kind_of(raw_ranks)}")
    if len(raw_ranks) != len(completions):
        raise row_error(
            row, "ranks", f"has {len(raw_ranks)} entries but 'completions' has {len(completions)}"
        )
    ranks = [number(row, f"ranks[{index}]", value) for index, value in enumerate(raw_ranks)]
    pairs = []
    for first in range(len(completions)):
        for second in range(first + 1, len(completions)):
            if ranks[first] == ranks[second]:
                continue
            better, worse = (first, second) if ranks[first] < ranks[second] else (second, first)
            check_distinct(
                row,
                f"completions[{better}]",
                completions[better],
                f"completions[{worse}]",
                completions[worse],
            )
            margin = abs(ranks[first] - ranks[second])
            pairs.append(
                PreferenceExample(
                    prompt, completions[better], completions[worse], margin, row.source, row.line
                )
            )
    if not pairs:
        raise row_error(row, "ranks", "are all tied, so the row gives no pair")
    return pairs


def unpaired_from_trl(row: Row) -> list[UnpairedExample]:
    """TRL unpaired preference (KTO): ``prompt`` + ``completion`` + boolean ``label``."""
    prompt = prompt_value(row, "prompt", require(row, "prompt"))
    completion = completion_value(row, "completion", require(row, "completion"), prompt)
    label = boolean(row, "label")
    return [UnpairedExample(prompt, completion, label, row.source, row.line)]


SFT_FORMATS: dict[str, Callable[[Row], list[SFTExample]]] = {
    "messages": sft_from_messages,
    "prompt_completion": sft_from_prompt_completion,
    "alpaca": sft_from_alpaca,
}
PREFERENCE_FORMATS: dict[str, Callable[[Row], list[PreferenceExample]]] = {
    "preference": preference_from_trl,
    "ranking": preferences_from_ranking,
    "hh": preference_from_hh,
    "summarize": preference_from_summarize,
    "ultrafeedback": preference_from_ultrafeedback,
}
UNPAIRED_FORMATS: dict[str, Callable[[Row], list[UnpairedExample]]] = {
    "unpaired": unpaired_from_trl
}


# 3. format detection ----------------------------------------------------------------------


def _columns(row: Row) -> str:
    return ", ".join(sorted(row.record)) or "none"


def detect_sft_format(row: Row) -> str:
    """The SFT format name for a row, from its columns.

    One telling column is enough, so a first row that lacks a field gets the
    "field ... is missing" error of its format rather than a detection failure.
    """
    columns = row.record.keys()
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} & columns:
        return "prompt_completion"
    if {"instruction", "output"} & columns:
        return "alpaca"
    if "text" in columns:
        raise row_error(
            row,
            "text",
            "is not used for SFT: give 'messages', 'prompt'+'completion' or 'instruction'+'output'",
        )
    raise row_error(
        row,
        None,
        f"cannot tell the SFT format from the columns ({_columns(row)}); "
        "expected 'messages', 'prompt'+'completion' or 'instruction'+'output'",
    )


def detect_preference_format(row: Row) -> str:
    """The preference format name for a row, from its columns (and the type of ``chosen``)."""
    columns = row.record.keys()
    if {"completions", "ranks"} & columns:
        return "ranking"
    if {"summaries", "info"} & columns:
        return "summarize"
    if {"score_chosen", "score_rejected"} & columns:
        return "ultrafeedback"
    if {"chosen", "rejected"} & columns:
        first_reply = row.record.get("chosen", row.record.get("rejected"))
        if "prompt" not in columns and isinstance(first_reply, str):
            return "hh"
        return "preference"
    raise row_error(
        row,
        None,
        f"cannot tell the preference format from the columns ({_columns(row)}); expected "
        "'chosen'+'rejected' (with or without 'prompt'), 'prompt'+'completions'+'ranks', "
        "or 'info'+'summaries'+'choice'",
    )


def detect_unpaired_format(row: Row) -> str:
    """The unpaired format name for a row (there is one: prompt/completion/label)."""
    if {"prompt", "completion", "label"} & row.record.keys():
        return "unpaired"
    raise row_error(
        row,
        None,
        f"cannot tell the unpaired format from the columns ({_columns(row)}); "
        "expected 'prompt'+'completion'+'label'",
    )


# 4. loaders -------------------------------------------------------------------------------


def _load(
    source: str | Sequence[Row],
    split: str | None,
    format: str | None,
    formats: dict[str, Callable[[Row], list[Example]]],
    detect: Callable[[Row], str],
    skipped: list[InputError] | None,
) -> list[Example]:
    rows = read_rows(source, split) if isinstance(source, str) else list(source)
    if not rows:
        raise InputError("contains no rows", path="<memory>")
    if format is None:
        format = detect(rows[0])
    if format not in formats:
        raise InputError(f"must be one of {', '.join(formats)}, got {format!r}", field="format")
    parse = formats[format]
    examples: list[Example] = []
    for row in rows:
        try:
            examples.extend(parse(row))
        except InputError as err:
            if skipped is None:
                raise
            skipped.append(err)
    if not examples:
        first_error = skipped[0] if skipped else "no examples"
        raise InputError(
            f"none of the {len(rows)} rows is valid (first: {first_error})", path=rows[0].source
        )
    return examples


def load_sft(
    source: str | Sequence[Row],
    *,
    format: str | None = None,
    split: str | None = None,
    skipped: list[InputError] | None = None,
) -> list[SFTExample]:
    """SFT examples from a file, dataset directory, dataset id, or rows already read.

    ``format`` is one of ``messages``, ``prompt_completion``, ``alpaca`` (detected when
    None). The first invalid row raises :class:`InputError`, unless a ``skipped`` list is
    given: then invalid rows are left out and their errors appended to it.
    """
    return _load(source, split, format, SFT_FORMATS, detect_sft_format, skipped)


def load_preferences(
    source: str | Sequence[Row],
    *,
    format: str | None = None,
    split: str | None = None,
    skipped: list[InputError] | None = None,
) -> list[PreferenceExample]:
    """Preference pairs from a file, dataset directory, dataset id, or rows already read.

    ``format`` is one of ``preference``, ``ranking``, ``hh``, ``summarize``,
    ``ultrafeedback`` (detected when None). A ranking row yields several pairs, which
    stay consecutive and share the row's line. ``skipped`` works as in :func:`load_sft`.
    """
    return _load(source, split, format, PREFERENCE_FORMATS, detect_preference_format, skipped)


def load_unpaired(
    source: str | Sequence[Row],
    *,
    format: str | None = None,
    split: str | None = None,
    skipped: list[InputError] | None = None,
) -> list[UnpairedExample]:
    """Unpaired (KTO) examples: ``prompt`` + ``completion`` + boolean ``label``.

    ``skipped`` works as in :func:`load_sft`.
    """
    return _load(source, split, format, UNPAIRED_FORMATS, detect_unpaired_format, skipped)
