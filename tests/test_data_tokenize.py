"""Chat-template tokenization, prompt/completion boundaries and the length policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.data import (
    PreferenceExample,
    SFTExample,
    UnpairedExample,
    encode_completion,
    encode_prompt,
    load_preferences,
    tokenize_pairs,
    tokenize_sft,
    tokenize_unpaired,
)
from alignkit.errors import InputError
from alignkit.models import load_tokenizer, tiny_model_dir

HH_FILE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "hh-rlhf-harmless-base.jsonl.gz"
)
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]
REPLY = [{"role": "assistant", "content": "It is 6."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(tiny_model_dir()))


def test_conversational_boundary_matches_the_chat_rendering(tokenizer):
    prompt_ids, completion_ids = encode_completion(tokenizer, CHAT, REPLY)
    full = tokenizer.apply_chat_template(CHAT + REPLY, tokenize=False)
    rendered_prompt = tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    # the full rendering ends "<|im_end|>\n"; the completion stops at the EOS
    assert full.endswith("It is 6.<|im_end|>\n")
    assert tokenizer.decode(prompt_ids + completion_ids) == full[: -len("\n")]
    assert tokenizer.decode(prompt_ids) == rendered_prompt
    assert tokenizer.decode(completion_ids) == "It is 6.<|im_end|>"
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert completion_ids.count(tokenizer.eos_token_id) == 1
    assert prompt_ids == encode_prompt(tokenizer, CHAT)
    assert rendered_prompt.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt


def test_standard_prompt_is_tokenized_plainly_and_completion_gets_eos(tokenizer):
    prompt_ids, completion_ids = encode_completion(tokenizer, "The sky is", " blue.")
    assert prompt_ids == tokenizer("The sky is")["input_ids"]
    assert completion_ids == tokenizer(" blue.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert tokenizer.decode(prompt_ids + completion_ids) == "The sky is blue.<|im_end|>"


def test_chosen_and_rejected_share_identical_prompt_ids(tokenizer):
    pairs = [
        PreferenceExample(CHAT, REPLY, [{"role": "assistant", "content": "Six, I think."}]),
        PreferenceExample("Q:", " yes", " no", margin=1.5),
    ]
    tokenized, report = tokenize_pairs(pairs, tokenizer, max_length=512)
    assert report.truncated == report.dropped == 0
    conversational, standard = tokenized
    assert conversational.prompt_ids == encode_prompt(tokenizer, CHAT)
    assert tokenizer.decode(conversational.prompt_ids + conversational.chosen_ids) == (
        tokenizer.apply_chat_template(CHAT + REPLY, tokenize=False).rstrip("\n")
    )
    assert tokenizer.decode(conversational.rejected_ids) == "Six, I think.<|im_end|>"
    assert (standard.margin, conversational.margin) == (1.5, None)
    for pair in tokenized:
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id


def test_hh_pairs_tokenize_with_shared_prompt_and_exact_boundaries(tokenizer):
    pairs = load_preferences(str(HH_FILE), skipped=[])[:40]
    tokenized, _ = tokenize_pairs(pairs, tokenizer, max_length=100_000)
    for example, pair in zip(pairs, tokenized, strict=True):
        for reply, ids in (
            (example.chosen, pair.chosen_ids),
            (example.rejected, pair.rejected_ids),
        ):
            full = tokenizer.apply_chat_template(example.prompt + reply, tokenize=False)
            assert tokenizer.decode(pair.prompt_ids + ids) + "\n" == full


def test_sft_and_unpaired_tokenization(tokenizer):
    (sft,), _ = tokenize_sft([SFTExample(CHAT, REPLY)], tokenizer, max_length=512)
    assert (sft.prompt_ids, sft.completion_ids) == encode_completion(tokenizer, CHAT, REPLY)
    unpaired, _ = tokenize_unpaired(
        [UnpairedExample("Q:", " a", True), UnpairedExample("Q:", " b", False)],
        tokenizer,
        max_length=512,
    )
    assert [item.label for item in unpaired] == [True, False]
    assert unpaired[0].completion_ids == tokenizer(" a", add_special_tokens=False)["input_ids"] + [
        2
    ]


def words(count: int) -> str:
    """``count`` tokens: " a" is one token in the SmolLM2 vocabulary."""
    return " a" * count


def test_word_helper_gives_one_token_per_word(tokenizer):
    assert len(tokenizer(words(40), add_special_tokens=False)["input_ids"]) == 40


def test_truncate_cuts_prompt_left_to_max_prompt_length_then_completion_right(tokenizer):
    long_prompt = SFTExample("x" + words(39), words(9))  # 40 prompt + 10 completion tokens
    long_completion = SFTExample("x" + words(9), words(39))  # 10 + 40
    fits = SFTExample("x" + words(9), words(9))  # 10 + 10
    tokenized, report = tokenize_sft(
        [long_prompt, long_completion, fits], tokenizer, max_length=32, max_prompt_length=16
    )
    original = [
        encode_completion(tokenizer, e.prompt, e.completion)
        for e in (long_prompt, long_completion, fits)
    ]
    assert [len(original[0][0]), len(original[0][1]), len(original[1][0]), len(original[1][1])] == [
        40,
        10,
        10,
        40,
    ]
    # long prompt: left end cut to 16 tokens, completion (with its EOS) kept whole
    assert tokenized[0].prompt_ids == original[0][0][-16:]
    assert tokenized[0].completion_ids == original[0][1]
    # long completion: prompt fits max_prompt_length, completion cut to 32 - 10 and loses EOS
    assert tokenized[1].prompt_ids == original[1][0]
    assert tokenized[1].completion_ids == original[1][1][:22]
    assert tokenized[1].completion_ids[-1] != tokenizer.eos_token_id
    assert (tokenized[2].prompt_ids, tokenized[2].completion_ids) == original[2]
    assert all(len(t.prompt_ids) + len(t.completion_ids) <= 32 for t in tokenized)
    assert (report.total, report.truncated, report.dropped) == (3, 2, 0)
    assert report.describe() == "2 of 3 rows over max_length=32 were truncated"


def test_drop_removes_overlong_rows_and_counts_them(tokenizer):
    examples = [SFTExample("x" + words(39), words(9)), SFTExample("x" + words(9), words(9))]
    tokenized, report = tokenize_sft(examples, tokenizer, max_length=32, overlong="drop")
    assert len(tokenized) == 1 and len(tokenized[0].prompt_ids) == 10
    assert report.describe() == "1 of 2 rows over max_length=32 were dropped"
    _, fits = tokenize_sft(examples[1:], tokenizer, max_length=32)
    assert fits.describe() == "all 1 rows fit max_length=32"


def test_pair_length_is_set_by_the_longer_completion(tokenizer):
    pair = PreferenceExample("x" + words(19), words(29), words(4))  # 20 prompt, 30 / 5 completion
    (truncated,), report = tokenize_pairs([pair], tokenizer, max_length=40, max_prompt_length=12)
    assert report.truncated == 1
    assert len(truncated.prompt_ids) == 12
    assert len(truncated.chosen_ids) == 28  # 40 - 12
    assert len(truncated.rejected_ids) == 5  # short side untouched: " a" x4 + EOS
    _, dropped = tokenize_pairs([pair], tokenizer, max_length=40, overlong="drop")
    assert dropped.dropped == 1


def test_bad_length_settings_and_missing_chat_template(tokenizer):
    example = [SFTExample("Q", " A")]
    with pytest.raises(InputError) as caught:
        tokenize_sft(example, tokenizer, max_length=32, max_prompt_length=32)
    assert (
        str(caught.value)
        == "config: field 'max_prompt_length' must be between 1 and max_length - 1 (31), got 32"
    )
    with pytest.raises(InputError) as caught:
        tokenize_sft(example, tokenizer, max_length=32, overlong="clip")
    assert (
        str(caught.value)
        == "config: field 'overlong' must be 'truncate', 'drop' or 'error', got 'clip'"
    )
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(InputError, match="has no chat template"):
            encode_prompt(tokenizer, CHAT)
        assert encode_prompt(tokenizer, "plain") == tokenizer("plain")["input_ids"]
    finally:
        tokenizer.chat_template = template
