"""Validation of data rows: every bad input is one line naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.data import (
    load_preferences,
    load_sft,
    load_unpaired,
)
from alignkit.errors import InputError


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.name


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path so error messages name short relative paths."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_of(load, *args, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# validation: one line naming file, line and field ----------------------------------------

GOOD_PAIR = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
CONVERSATION_PAIR = {
    "prompt": [user("Q")],
    "chosen": [assistant("yes")],
    "rejected": [assistant("no")],
}

PREFERENCE_ERRORS = [
    ({"prompt": "Q", "chosen": "yes"}, "field 'rejected' is missing"),
    ({"prompt": "Q", "chosen": "", "rejected": "no"}, "field 'chosen' is empty"),
    ({"prompt": "Q", "chosen": "   ", "rejected": "no"}, "field 'chosen' is empty"),
    ({"prompt": None, "chosen": "yes", "rejected": "no"}, "field 'prompt' is empty"),
    (
        {"prompt": "Q", "chosen": 3, "rejected": "no"},
        "field 'chosen' must be a string or a list of chat messages, got a number",
    ),
    (
        {"prompt": 7, "chosen": "a", "rejected": "b"},
        "field 'prompt' must be a string or a list of chat messages, got a number",
    ),
    (
        {"prompt": "Q", "chosen": " same", "rejected": "same "},
        "field 'rejected' is identical to 'chosen'",
    ),
    ({**GOOD_PAIR, "margin": "big"}, "field 'margin' must be a number, got a string"),
    ({**GOOD_PAIR, "margin": True}, "field 'margin' must be a number, got a boolean"),
    (
        {"prompt": "Q", "chosen": [assistant("yes")], "rejected": "no"},
        "field 'chosen' must be a string when 'prompt' is a string, got a list",
    ),
    (
        {**CONVERSATION_PAIR, "rejected": "no"},
        "field 'rejected' must be a list of chat messages when 'prompt' is one, got a string",
    ),
    ({**CONVERSATION_PAIR, "prompt": [{"content": "Q"}]}, "field 'prompt[0].role' is missing"),
    (
        {**CONVERSATION_PAIR, "prompt": [{"role": "user", "content": 5}]},
        "field 'prompt[0].content' must be a string, got a number",
    ),
    (
        {**CONVERSATION_PAIR, "prompt": ["Q"]},
        "field 'prompt[0]' must be a chat message {role, content}, got a string",
    ),
    (
        {**CONVERSATION_PAIR, "chosen": [user("yes")]},
        "field 'chosen[0].role' must be 'assistant', got 'user'",
    ),
    ({**CONVERSATION_PAIR, "chosen": [assistant("")]}, "field 'chosen[0].content' is empty"),
    (
        {**CONVERSATION_PAIR, "rejected": [assistant("yes")]},
        "field 'rejected' is identical to 'chosen'",
    ),
    (
        {"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("c")]},
        "field 'rejected' shares no leading prompt turn with 'chosen'",
    ),
    (
        {"prompt": "Q", "completions": ["a", "b", "c", "d"], "ranks": [1, 2, 3]},
        "field 'ranks' has 3 entries but 'completions' has 4",
    ),
    (
        {"prompt": "Q", "completions": ["a", "b"], "ranks": [1, "2"]},
        "field 'ranks[1]' must be a number, got a string",
    ),
    (
        {"prompt": "Q", "completions": ["a", "b"], "ranks": [1, 1]},
        "field 'ranks' are all tied, so the row gives no pair",
    ),
    (
        {"prompt": "Q", "completions": ["a"], "ranks": [1]},
        "field 'completions' must hold at least 2 completions, got 1",
    ),
    (
        {"prompt": "Q", "completions": ["a", "a"], "ranks": [1, 2]},
        "field 'completions[1]' is identical to 'completions[0]'",
    ),
    (
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
        "field 'chosen' has an empty last 'Assistant:' reply",
    ),
    (
        {"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Ho\n\nAssistant: B"},
        "field 'rejected' differs from 'chosen' before the last 'Assistant:' reply",
    ),
    (
        {"chosen": "Hi there", "rejected": "\n\nHuman: Hi\n\nAssistant: B"},
        "field 'chosen' does not start with a 'Human:' turn after a blank line",
    ),
    (
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: ?",
            "rejected": "\n\nHuman: Hi\n\nAssistant: B",
        },
        "field 'chosen' does not end with an 'Assistant:' reply",
    ),
    (
        {"info": {"post": "P"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2},
        "field 'choice' must be an index into 'summaries' (0 to 1), got 2",
    ),
    (
        {"info": {"title": "T"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0},
        "field 'info.post' is missing",
    ),
    (
        {"info": {"post": "P"}, "summaries": [{"text": "a"}, {"txt": "b"}], "choice": 0},
        "field 'summaries[1].text' is missing",
    ),
    (
        {
            "chosen": [user("Q"), assistant("a")],
            "rejected": [user("Q"), assistant("b")],
            "score_chosen": 1,
            "score_rejected": 2,
        },
        "field 'score_chosen' is lower than 'score_rejected' (1.0 < 2.0)",
    ),
    (
        {"question": "Q"},
        "cannot tell the preference format from the columns (question); expected 'chosen'+'rejected' (with or without 'prompt'), 'prompt'+'completions'+'ranks', or 'info'+'summaries'+'choice'",
    ),
]


@pytest.mark.parametrize(("bad_row", "message"), PREFERENCE_ERRORS)
def test_each_bad_preference_row_names_file_line_and_field(in_tmp, bad_row, message):
    # the bad row is line 3: a good row of the same format comes first, then a blank line
    good_row = good_row_for(bad_row)
    first_line = json.dumps(good_row) if good_row is not None else ""
    (in_tmp / "prefs.jsonl").write_text(f"{first_line}\n\n{json.dumps(bad_row)}\n")
    assert error_of(load_preferences, "prefs.jsonl") == f"prefs.jsonl:3: {message}"


def good_row_for(bad_row: dict) -> dict | None:
    """A valid row of the bad row's format (None when there is none), to put before it."""
    if "question" in bad_row:
        return None
    if "completions" in bad_row:
        return {"prompt": "Q", "completions": ["a", "b"], "ranks": [1, 2]}
    if "summaries" in bad_row:
        return {"info": {"post": "P"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}
    if "score_chosen" in bad_row:
        return {
            "chosen": [user("Q"), assistant("a")],
            "rejected": [user("Q"), assistant("b")],
            "score_chosen": 2,
            "score_rejected": 1,
        }
    if "prompt" not in bad_row and isinstance(bad_row.get("chosen"), str):
        return {
            "chosen": "\n\nHuman: Hi\n\nAssistant: A",
            "rejected": "\n\nHuman: Hi\n\nAssistant: B",
        }
    if "prompt" not in bad_row:
        return {"chosen": [user("Q"), assistant("a")], "rejected": [user("Q"), assistant("b")]}
    if isinstance(bad_row["prompt"], list):
        return CONVERSATION_PAIR
    return GOOD_PAIR


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (
            {"prompt": "Q", "completion": "A", "label": 1},
            "field 'label' must be true or false, got 1",
        ),
        (
            {"prompt": "Q", "completion": "A", "label": "yes"},
            "field 'label' must be true or false, got \"yes\"",
        ),
        (
            {"prompt": "Q", "completion": "A", "label": None},
            "field 'label' must be true or false, got null",
        ),
        ({"prompt": "Q", "completion": "", "label": True}, "field 'completion' is empty"),
    ],
)
def test_each_bad_unpaired_row_names_file_line_and_field(in_tmp, bad_row, message):
    write_jsonl(in_tmp / "kto.jsonl", [{"prompt": "Q", "completion": "A", "label": False}, bad_row])
    assert error_of(load_unpaired, "kto.jsonl") == f"kto.jsonl:2: {message}"


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"messages": [user("a")]}, "field 'messages' has no assistant turn"),
        (
            {"messages": [user("a"), assistant("b"), user("c")]},
            "field 'messages' must end with an assistant turn, got 'user' last",
        ),
        (
            {"messages": [assistant("b")]},
            "field 'messages' has no turn before the last assistant turn",
        ),
        ({"messages": [user("a"), assistant(" ")]}, "field 'messages[1].content' is empty"),
        (
            {"messages": [user("a"), {"role": "assistant"}]},
            "field 'messages[1].content' is missing",
        ),
        (
            {"messages": [{"role": 1, "content": "a"}, assistant("b")]},
            "field 'messages[0].role' must be a string, got a number",
        ),
        ({"messages": "hello"}, "field 'messages' must be a list of chat messages, got a string"),
        ({"messages": []}, "field 'messages' is empty"),
    ],
)
def test_each_bad_sft_row_names_file_line_and_field(in_tmp, bad_row, message):
    write_jsonl(in_tmp / "sft.jsonl", [{"messages": [user("a"), assistant("b")]}, bad_row])
    assert error_of(load_sft, "sft.jsonl") == f"sft.jsonl:2: {message}"


def test_malformed_json_line_names_file_and_line(in_tmp):
    (in_tmp / "prefs.jsonl").write_text(json.dumps(GOOD_PAIR) + '\n{"prompt": "Q" "chosen": "a"}\n')
    assert error_of(load_preferences, "prefs.jsonl") == (
        "prefs.jsonl:2: invalid JSON (Expecting ',' delimiter at column 16)"
    )
    (in_tmp / "list.jsonl").write_text(json.dumps(GOOD_PAIR) + "\n[1, 2]\n")
    assert (
        error_of(load_preferences, "list.jsonl")
        == "list.jsonl:2: each row must be a JSON object, got a list"
    )
    (in_tmp / "bad.json").write_text('[\n  {"prompt": "Q"},\n  {"prompt": }\n]')
    assert (
        error_of(load_preferences, "bad.json")
        == "bad.json:3: invalid JSON (Expecting value at column 14)"
    )


def test_empty_files_are_refused(in_tmp):
    for name, content in (
        ("e.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("e.json", "[]"),
        ("e.csv", ""),
    ):
        (in_tmp / name).write_text(content)
        assert error_of(load_preferences, name) == f"{name}: contains no rows"


def test_a_bad_first_row_gets_its_field_error_not_a_detection_failure(in_tmp):
    write_jsonl(in_tmp / "p.jsonl", [{"prompt": "Q", "chosen": "yes"}, GOOD_PAIR])
    assert error_of(load_preferences, "p.jsonl") == "p.jsonl:1: field 'rejected' is missing"
    write_jsonl(in_tmp / "k.jsonl", [{"prompt": "Q", "completion": "A"}])
    assert error_of(load_unpaired, "k.jsonl") == "k.jsonl:1: field 'label' is missing"
    write_jsonl(in_tmp / "s.jsonl", [{"instruction": "Do it."}])
    assert error_of(load_sft, "s.jsonl") == "s.jsonl:1: field 'output' is missing"
    write_jsonl(in_tmp / "r.jsonl", [{"prompt": "Q", "completions": ["a", "b"]}])
    assert error_of(load_preferences, "r.jsonl") == "r.jsonl:1: field 'ranks' is missing"


def test_skipped_collects_bad_rows_and_keeps_good_ones(in_tmp):
    write_jsonl(
        in_tmp / "p.jsonl", [GOOD_PAIR, {"prompt": "Q", "chosen": "", "rejected": "no"}, GOOD_PAIR]
    )
    skipped: list[InputError] = []
    pairs = load_preferences("p.jsonl", skipped=skipped)
    assert [pair.line for pair in pairs] == [1, 3]
    assert [str(err) for err in skipped] == ["p.jsonl:2: field 'chosen' is empty"]
    write_jsonl(in_tmp / "all_bad.jsonl", [{"prompt": "Q", "chosen": "", "rejected": "no"}])
    assert error_of(load_preferences, "all_bad.jsonl", skipped=[]) == (
        "all_bad.jsonl: none of the 1 rows is valid (first: all_bad.jsonl:1: field 'chosen' is empty)"
    )
