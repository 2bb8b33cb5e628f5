"""Reading sources, format detection and the public-data adapters of alignkit.data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from alignkit.data import (
    PreferenceExample,
    load_preferences,
    load_sft,
    load_unpaired,
    read_rows,
    split_hh_transcript,
)
from alignkit.errors import InputError

HH_FILE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "hh-rlhf-harmless-base.jsonl.gz"
)


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


# 1. sources --------------------------------------------------------------------------------

ROWS = [{"prompt": "Hi", "completion": " there"}, {"prompt": "Bye", "completion": " now"}]


def test_jsonl_keeps_physical_line_numbers_across_blank_lines(in_tmp):
    (in_tmp / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    rows = read_rows("d.jsonl")
    assert [(row.record, row.source, row.line) for row in rows] == [
        (ROWS[0], "d.jsonl", 1),
        (ROWS[1], "d.jsonl", 4),
    ]


def test_jsonl_gz_json_parquet_csv_read_the_same_rows(in_tmp):
    import pandas as pd

    with gzip.open(in_tmp / "d.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in ROWS))
    (in_tmp / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(in_tmp / "d.parquet")
    pd.DataFrame(ROWS).to_csv(in_tmp / "d.csv", index=False)
    for name in ("d.jsonl.gz", "d.json", "d.parquet", "d.csv"):
        rows = read_rows(name)
        assert [row.record for row in rows] == ROWS, name
        assert [row.line for row in rows] == [1, 2], name
        examples = load_sft(name)
        assert [(e.prompt, e.completion, e.line) for e in examples] == [
            ("Hi", " there", 1),
            ("Bye", " now", 2),
        ]


def test_json_file_holding_json_lines_is_read_as_jsonl(in_tmp):
    write_jsonl(in_tmp / "d.json", ROWS)
    assert [row.record for row in read_rows("d.json")] == ROWS
    write_jsonl(in_tmp / "one.json", ROWS[:1])
    assert [row.record for row in read_rows("one.json")] == ROWS[:1]


def test_unicode_line_separators_inside_strings_do_not_split_rows(in_tmp):
    rows = [{"prompt": "a\u2028b\u0085c", "completion": "d\re"}, ROWS[1]]
    (in_tmp / "u.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows), newline=""
    )
    read = read_rows("u.jsonl")
    assert [(row.record, row.line) for row in read] == [(rows[0], 1), (ROWS[1], 2)]


def test_csv_blank_cell_is_empty_and_missing_margin_is_none(in_tmp):
    (in_tmp / "p.csv").write_text("prompt,chosen,rejected,margin\nQ,good,bad,\nQ,good,,2\n")
    assert error_of(load_preferences, "p.csv") == "p.csv:2: field 'rejected' is empty"
    (in_tmp / "p.csv").write_text("prompt,chosen,rejected,margin\nQ,good,bad,\nQ,good,worse,2\n")
    assert [e.margin for e in load_preferences("p.csv")] == [None, 2.0]


def test_csv_booleans_and_numbers_become_python_values(in_tmp):
    (in_tmp / "k.csv").write_text("prompt,completion,label\nQ,yes,true\nQ,no,False\n")
    assert [(e.completion, e.label) for e in load_unpaired("k.csv")] == [
        ("yes", True),
        ("no", False),
    ]
    (in_tmp / "k.csv").write_text("prompt,completion,label\nQ,yes,1\n")
    assert error_of(load_unpaired, "k.csv") == "k.csv:1: field 'label' must be true or false, got 1"
    (in_tmp / "p.csv").write_text("prompt,chosen,rejected,margin\nQ,a,b,3\n")
    (pair,) = load_preferences(read_rows("p.csv"))  # rows already read are accepted too
    assert pair.margin == 3.0 and type(pair.margin) is float


def test_dataset_directories_saved_or_as_data_files(in_tmp):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(in_tmp / "saved"))
    assert [row.record for row in read_rows("saved")] == ROWS
    test_rows = read_rows("saved", split="test")
    assert [(row.record, row.line) for row in test_rows] == [(ROWS[0], 1)]
    assert (
        error_of(read_rows, "saved", split="dev")
        == "saved: has no split 'dev' (splits: train, test)"
    )
    (in_tmp / "files").mkdir()
    write_jsonl(in_tmp / "files" / "train.jsonl", ROWS)
    rows = read_rows("files")
    assert [(row.record, row.line, row.source) for row in rows] == [
        (ROWS[0], 1, "files"),
        (ROWS[1], 2, "files"),
    ]


def test_dataset_id_goes_to_load_dataset_with_the_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows("someone/prefs")
    assert calls == [("someone/prefs", "train")]
    assert [(row.record, row.source, row.line) for row in rows] == [
        (ROWS[0], "someone/prefs", 1),
        (ROWS[1], "someone/prefs", 2),
    ]
    read_rows("someone/prefs", split="test")
    assert calls[-1] == ("someone/prefs", "test")


def test_unreachable_dataset_id_is_one_line_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert error_of(read_rows, "someone/no-such-set").startswith(
        "someone/no-such-set: cannot load dataset ("
    )


def test_missing_file_and_unsupported_type(in_tmp):
    assert error_of(read_rows, "nope.jsonl") == "nope.jsonl: file not found"
    (in_tmp / "d.txt").write_text("hello")
    assert error_of(read_rows, "d.txt").startswith("d.txt: unsupported file type")


# 2. SFT formats -----------------------------------------------------------------------------


def test_sft_messages_prompt_is_everything_before_the_last_assistant_turn(in_tmp):
    turns = [user("a"), assistant("b"), user("c"), assistant("d")]
    write_jsonl(in_tmp / "s.jsonl", [{"messages": turns}])
    (example,) = load_sft("s.jsonl")
    assert example.prompt == turns[:3]
    assert example.completion == [assistant("d")]
    assert (example.source, example.line) == ("s.jsonl", 1)


def test_sft_prompt_completion_standard_and_conversational(in_tmp):
    write_jsonl(
        in_tmp / "s.jsonl",
        [
            {"prompt": "The sky is", "completion": " blue."},
            {"prompt": [user("Sky?")], "completion": [assistant("Blue.")]},
        ],
    )
    standard, conversational = load_sft("s.jsonl")
    assert (standard.prompt, standard.completion) == ("The sky is", " blue.")
    assert (conversational.prompt, conversational.completion) == (
        [user("Sky?")],
        [assistant("Blue.")],
    )


def test_sft_alpaca_becomes_one_user_and_one_assistant_turn(in_tmp):
    write_jsonl(
        in_tmp / "a.jsonl",
        [
            {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ],
    )
    with_input, without_input = load_sft("a.jsonl")
    assert with_input.prompt == [user("Translate.\n\nbonjour")]
    assert with_input.completion == [assistant("hello")]
    assert without_input.prompt == [user("Say hi.")]


def test_sft_text_rows_and_unknown_columns_are_refused(in_tmp):
    write_jsonl(in_tmp / "t.jsonl", [{"text": "just text"}])
    assert error_of(load_sft, "t.jsonl") == (
        "t.jsonl:1: field 'text' is not used for SFT: give 'messages', 'prompt'+'completion' or 'instruction'+'output'"
    )
    write_jsonl(in_tmp / "u.jsonl", [{"question": "q", "answer": "a"}])
    assert error_of(load_sft, "u.jsonl") == (
        "u.jsonl:1: cannot tell the SFT format from the columns (answer, question); "
        "expected 'messages', 'prompt'+'completion' or 'instruction'+'output'"
    )


def test_explicit_format_overrides_detection(in_tmp):
    write_jsonl(
        in_tmp / "s.jsonl",
        [{"prompt": "p", "completion": "c", "messages": [user("x"), assistant("y")]}],
    )
    assert load_sft("s.jsonl")[0].prompt == [user("x")]
    assert load_sft("s.jsonl", format="prompt_completion")[0].prompt == "p"
    assert error_of(load_sft, "s.jsonl", format="chatml") == (
        "field 'format' must be one of messages, prompt_completion, alpaca, got 'chatml'"
    )


# 3. preference formats ----------------------------------------------------------------------


def test_preference_standard_conversational_and_margin(in_tmp):
    write_jsonl(
        in_tmp / "p.jsonl",
        [
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2},
            {
                "prompt": [user("Sky?")],
                "chosen": [assistant("Blue.")],
                "rejected": [assistant("Green.")],
            },
        ],
    )
    standard, conversational = load_preferences("p.jsonl")
    assert standard == PreferenceExample("The sky is", " blue.", " green.", 2.0, "p.jsonl", 1)
    assert conversational == PreferenceExample(
        [user("Sky?")], [assistant("Blue.")], [assistant("Green.")], None, "p.jsonl", 2
    )


def test_preference_implicit_prompt_is_the_shared_leading_turns(in_tmp):
    shared = [user("a"), assistant("b"), user("c")]
    write_jsonl(
        in_tmp / "p.jsonl",
        [{"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]}],
    )
    (example,) = load_preferences("p.jsonl")
    assert example.prompt == shared
    assert (example.chosen, example.rejected) == ([assistant("good")], [assistant("bad")])


def test_ranking_expands_to_all_untied_pairs_with_rank_gap_margin(in_tmp):
    write_jsonl(
        in_tmp / "r.jsonl",
        [
            {"prompt": "Q", "completions": ["w", "x", "y", "z"], "ranks": [2, 1, 4, 3]},
            {"prompt": "Q2", "completions": ["a", "b", "c"], "ranks": [1, 1, 2]},
        ],
    )
    pairs = load_preferences("r.jsonl")
    first = [(p.chosen, p.rejected, p.margin) for p in pairs if p.prompt == "Q"]
    assert len(first) == 6  # C(4, 2)
    assert first == [
        ("x", "w", 1.0),
        ("w", "y", 2.0),
        ("w", "z", 1.0),
        ("x", "y", 3.0),
        ("x", "z", 2.0),
        ("z", "y", 1.0),
    ]
    second = [(p.chosen, p.rejected, p.margin, p.line) for p in pairs if p.prompt == "Q2"]
    assert second == [("a", "c", 1.0, 2), ("b", "c", 1.0, 2)]  # C(3, 2) = 3 minus one tie


# 4. adapters for public data sets -----------------------------------------------------------

HH_ROWS = [
    {
        "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?"
        "\n\nAssistant: Knead it and let it rise.",
        "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?"
        "\n\nAssistant: Buy some instead.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Here is a joke:\n\nAssistant: Knock knock.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!",
    },
]


def test_hh_transcripts_split_into_prompt_turns_and_final_replies(in_tmp):
    write_jsonl(in_tmp / "hh.jsonl", HH_ROWS)
    multi_turn, merged = load_preferences("hh.jsonl")
    assert multi_turn.prompt == [
        user("How do I bake bread?"),
        assistant("Mix flour and water."),
        user("Then?"),
    ]
    assert multi_turn.chosen == [assistant("Knead it and let it rise.")]
    assert multi_turn.rejected == [assistant("Buy some instead.")]
    assert merged.prompt == [user("Hi")]  # two Assistant turns in a row are one reply
    assert merged.chosen == [assistant("Here is a joke:\n\nKnock knock.")]
    assert split_hh_transcript("\n\nHuman: a  Human: b\n\nAssistant: c") == [
        user("a  Human: b"),
        assistant("c"),
    ]


def test_summarize_from_feedback_comparisons(in_tmp):
    rows = [
        {
            "info": {
                "id": "t3_1",
                "post": "I lost my keys again.",
                "title": "Keys",
                "subreddit": "tifu",
                "site": None,
            },
            "summaries": [
                {"text": " Lost keys.", "policy": "sup", "note": None},
                {"text": "Found keys.", "policy": "ref"},
            ],
            "choice": 1,
            "worker": "w1",
            "split": "train",
        },
        {
            "info": {
                "id": "cnn_1",
                "post": None,
                "article": "Rain fell.",
                "title": "Weather",
                "site": "cnn",
            },
            "summaries": [{"text": "It rained."}, {"text": "Sunny."}],
            "choice": 0,
        },
    ]
    write_jsonl(in_tmp / "c.jsonl", rows)
    reddit, news = load_preferences("c.jsonl")
    assert (
        reddit.prompt == "SUBREDDIT: r/tifu\n\nTITLE: Keys\n\nPOST: I lost my keys again.\n\nTL;DR:"
    )
    assert (reddit.chosen, reddit.rejected, reddit.margin) == (" Found keys.", " Lost keys.", None)
    assert news.prompt == "TITLE: Weather\n\nARTICLE: Rain fell.\n\nTL;DR:"
    assert (news.chosen, news.rejected) == (" It rained.", " Sunny.")


def test_ultrafeedback_binarized_margin_is_the_score_gap(in_tmp):
    rows = [
        {
            "prompt": "Name a prime.",
            "prompt_id": "abc",
            "chosen": [user("Name a prime."), assistant("7")],
            "rejected": [user("Name a prime."), assistant("8")],
            "messages": [user("Name a prime."), assistant("7")],
            "score_chosen": 9.0,
            "score_rejected": 3.5,
        },
        {
            "prompt": "Say hi.",
            "prompt_id": "def",
            "chosen": [user("Say hi."), assistant("Hi!")],
            "rejected": [user("Say hi."), assistant("No.")],
            "messages": [user("Say hi."), assistant("Hi!")],
            "score_chosen": 5,
            "score_rejected": 5,
        },
    ]
    write_jsonl(in_tmp / "uf.jsonl", rows)
    prime, tie = load_preferences("uf.jsonl")
    assert prime == PreferenceExample(
        [user("Name a prime.")], [assistant("7")], [assistant("8")], 5.5, "uf.jsonl", 1
    )
    assert tie.margin == 0.0


def test_hh_real_file_splits_cleanly_with_four_empty_replies_rejected():
    rows = read_rows(str(HH_FILE))
    assert len(rows) == 1912
    skipped: list[InputError] = []
    pairs = load_preferences(str(HH_FILE), skipped=skipped)
    assert len(pairs) == 1908
    # Four rows of the published data have an empty last chosen reply ("\n\nAssistant:" then nothing).
    assert [(err.line, err.field, err.message) for err in skipped] == [
        (line, "chosen", "has an empty last 'Assistant:' reply") for line in (523, 611, 721, 1703)
    ]
    for pair in pairs:
        roles = [message["role"] for message in pair.prompt]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], pair.line
        assert [m["role"] for m in pair.chosen + pair.rejected] == ["assistant", "assistant"]
        assert pair.chosen[0]["content"] and pair.rejected[0]["content"]
        assert pair.chosen != pair.rejected
    assert pairs[0].prompt[0] == user(
        "What can I fill my sister's shampoo bottle with to prank her?"
    )
    assert error_of(load_preferences, str(HH_FILE)) == (
        f"{HH_FILE}:523: field 'chosen' has an empty last 'Assistant:' reply"
    )


def test_unpaired_kto_rows(in_tmp):
    write_jsonl(
        in_tmp / "k.jsonl",
        [
            {"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": [user("Sky?")], "completion": [assistant("Green.")], "label": False},
        ],
    )
    good, bad = load_unpaired("k.jsonl")
    assert (good.prompt, good.completion, good.label) == ("The sky is", " blue.", True)
    assert (bad.prompt, bad.completion, bad.label, bad.line) == (
        [user("Sky?")],
        [assistant("Green.")],
        False,
        2,
    )
