"""Field checks for one data row; every failure is an :class:`InputError` naming file, line and field.

The messages are fixed so users (and tests) can rely on them:

- ``field 'x' is missing``: the row has no column ``x``
- ``field 'x' is empty``: the value is ``""``, whitespace, ``null`` or ``[]``
- ``field 'x' must be <kind>, got <kind>``: wrong type (``got a number``)
- ``field 'rejected' is identical to 'chosen'``
- ``field 'label' must be true or false, got 1``
- ``field 'ranks' has 3 entries but 'completions' has 4``

Nested fields are named with a path: ``chosen[1].content``, ``info.post``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from alignkit.data.examples import Completion, Message, Prompt, Row
from alignkit.errors import InputError


def kind_of(value: Any) -> str:
    """A user-facing name for a value's JSON type: ``a string``, ``a number``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shown(value: Any) -> str:
    """A value as it would look in a JSON file (``1``, ``"yes"``, ``null``), cut to 40 characters."""
    try:
        rendered = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        rendered = repr(value)
    return rendered if len(rendered) <= 40 else rendered[:37] + "..."


def row_error(row: Row, field: str | None, message: str) -> InputError:
    """The error for ``row``: ``path:line: field 'name' message``."""
    return InputError(message, path=row.source, line=row.line, field=field)


def is_blank(value: Any) -> bool:
    """True for values that count as empty: None, NaN, blank strings, empty lists."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return False


def require(row: Row, field: str) -> Any:
    """The value of a top-level column that must be present and non-empty."""
    if field not in row.record:
        raise row_error(row, field, "is missing")
    value = row.record[field]
    if is_blank(value):
        raise row_error(row, field, "is empty")
    return value


def text(row: Row, field: str, value: Any) -> str:
    """``value`` (named ``field``) as a non-empty string."""
    if is_blank(value):
        raise row_error(row, field, "is empty")
    if not isinstance(value, str):
        raise row_error(row, field, f"must be a string, got {kind_of(value)}")
    return value


def chat_messages(row: Row, field: str, value: Any) -> list[Message]:
    """``value`` as a non-empty list of ``{role, content}`` messages with string values."""
    if is_blank(value):
        raise row_error(row, field, "is empty")
    if not isinstance(value, (list, tuple)):
        raise row_error(row, field, f"must be a list of chat messages, got {kind_of(value)}")
    messages = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise row_error(
                row, where, f"must be a chat message {{role, content}}, got {kind_of(item)}"
            )
        for key in ("role", "content"):
            if key not in item or item[key] is None:
                raise row_error(row, f"{where}.{key}", "is missing")
            if not isinstance(item[key], str):
                raise row_error(
                    row, f"{where}.{key}", f"must be a string, got {kind_of(item[key])}"
                )
        if not item["role"].strip():
            raise row_error(row, f"{where}.role", "is empty")
        messages.append({"role": item["role"], "content": item["content"]})
    return messages


def prompt_value(row: Row, field: str, value: Any) -> Prompt:
    """A prompt: a non-empty string or a list of chat messages."""
    if isinstance(value, str) or is_blank(value):
        return text(row, field, value)
    if isinstance(value, (list, tuple)):
        return chat_messages(row, field, value)
    raise row_error(
        row, field, f"must be a string or a list of chat messages, got {kind_of(value)}"
    )


def assistant_messages(row: Row, field: str, value: Any, first_index: int = 0) -> list[Message]:
    """Conversational completion: assistant messages, the last one non-empty.

    ``first_index`` is where these messages start in the original list (for error paths).
    """
    messages = chat_messages(row, field, value)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            where = f"{field}[{first_index + index}].role"
            raise row_error(row, where, f"must be 'assistant', got {message['role']!r}")
    if not messages[-1]["content"].strip():
        raise row_error(row, f"{field}[{first_index + len(messages) - 1}].content", "is empty")
    return messages


def completion_value(row: Row, field: str, value: Any, prompt: Prompt) -> Completion:
    """A completion in the same form as ``prompt``: a string, or assistant messages."""
    if isinstance(prompt, str):
        if isinstance(value, (list, tuple)) and not is_blank(value):
            raise row_error(row, field, "must be a string when 'prompt' is a string, got a list")
        if not isinstance(value, str) and not is_blank(value):
            raise row_error(
                row, field, f"must be a string or a list of chat messages, got {kind_of(value)}"
            )
        return text(row, field, value)
    if isinstance(value, str) and not is_blank(value):
        raise row_error(
            row, field, "must be a list of chat messages when 'prompt' is one, got a string"
        )
    if not isinstance(value, (list, tuple)) and not is_blank(value):
        raise row_error(
            row, field, f"must be a string or a list of chat messages, got {kind_of(value)}"
        )
    return assistant_messages(row, field, value)


def boolean(row: Row, field: str) -> bool:
    """A true/false column; ``1``, ``"yes"`` and friends are refused rather than guessed."""
    if field not in row.record:
        raise row_error(row, field, "is missing")
    value = row.record[field]
    if not isinstance(value, bool):
        raise row_error(row, field, f"must be true or false, got {shown(value)}")
    return value


def number(row: Row, field: str, value: Any) -> float:
    """A finite int or float (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise row_error(row, field, f"must be a number, got {kind_of(value)}")
    if not math.isfinite(value):
        raise row_error(row, field, f"must be a finite number, got {shown(value)}")
    return float(value)


def optional_number(row: Row, field: str) -> float | None:
    """A numeric column that may be absent or empty (then ``None``)."""
    value = row.record.get(field)
    if is_blank(value):
        return None
    return number(row, field, value)


def check_distinct(
    row: Row, chosen_field: str, chosen: Completion, rejected_field: str, rejected: Completion
) -> None:
    """Refuse a pair whose two completions are the same text."""
    if _plain(chosen) == _plain(rejected):
        raise row_error(row, rejected_field, f"is identical to '{chosen_field}'")


def _plain(completion: Completion) -> Any:
    if isinstance(completion, str):
        return completion.strip()
    return [(m["role"], m["content"].strip()) for m in completion]
