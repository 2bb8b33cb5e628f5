"""Adapters for public preference data sets, each by its published schema.

- Anthropic HH-RLHF: ``{"chosen": transcript, "rejected": transcript}`` where a
  transcript alternates ``\\n\\nHuman: ...`` and ``\\n\\nAssistant: ...``.
- OpenAI summarize-from-feedback comparisons: ``info`` (``post``, ``title``,
  ``subreddit``; CNN/DM rows have ``article``), ``summaries`` (a list of ``{text}``)
  and ``choice`` (the index of the preferred summary).
- UltraFeedback binarized: ``prompt``, ``chosen`` and ``rejected`` as full message
  lists (user turn + assistant reply), ``score_chosen`` and ``score_rejected``.

Each adapter turns one :class:`Row` into :class:`PreferenceExample` objects or raises
an :class:`~alignkit.errors.InputError` naming the row and field.
"""

from __future__ import annotations

import re

from alignkit.data.examples import Message, PreferenceExample, Prompt, Row
from alignkit.data.validation import (
    assistant_messages,
    chat_messages,
    check_distinct,
    is_blank,
    kind_of,
    number,
    require,
    row_error,
    shown,
    text,
)

_HH_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(transcript: str) -> list[Message]:
    """Chat messages from an HH transcript; consecutive turns of one speaker are merged.

    Raises ``ValueError`` when the transcript does not start with a Human turn.
    Text such as ``"  Human: ..."`` inside a turn (no blank line before it) is
    content, not a new turn: that is how it appears in the published data.
    """
    pieces = _HH_TURN_MARKER.split(transcript)
    if pieces[0].strip() or len(pieces) < 3:
        raise ValueError("does not start with a 'Human:' turn after a blank line")
    turns: list[Message] = []
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role = _HH_ROLES[speaker]
        content = content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = "\n\n".join(
                part for part in (turns[-1]["content"], content) if part
            )
        else:
            turns.append({"role": role, "content": content})
    return turns


def preference_from_hh(row: Row) -> list[PreferenceExample]:
    """One HH row: the shared turns become the prompt, the two last Assistant replies the pair."""
    dialogues = {}
    for field in ("chosen", "rejected"):
        transcript = text(row, field, require(row, field))
        try:
            turns = split_hh_transcript(transcript)
        except ValueError as err:
            raise row_error(row, field, str(err)) from None
        if turns[-1]["role"] != "assistant":
            raise row_error(row, field, "does not end with an 'Assistant:' reply")
        if len(turns) < 2:
            raise row_error(row, field, "has no 'Human:' turn before the last 'Assistant:' reply")
        if not turns[-1]["content"]:
            raise row_error(row, field, "has an empty last 'Assistant:' reply")
        dialogues[field] = turns
    prompt = dialogues["chosen"][:-1]
    if dialogues["rejected"][:-1] != prompt:
        raise row_error(row, "rejected", "differs from 'chosen' before the last 'Assistant:' reply")
    chosen = dialogues["chosen"][-1:]
    rejected = dialogues["rejected"][-1:]
    check_distinct(row, "chosen", chosen, "rejected", rejected)
    return [PreferenceExample(prompt, chosen, rejected, None, row.source, row.line)]


def split_shared_prompt(
    row: Row,
    chosen: list[Message],
    rejected: list[Message],
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two full conversations into (shared prompt, chosen reply, rejected reply).

    The prompt is the longest common run of leading messages, shortened so that it
    does not end with an assistant turn; everything after it must be assistant turns.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0:
        raise row_error(row, rejected_field, f"shares no leading prompt turn with '{chosen_field}'")
    replies = []
    for field, conversation in ((chosen_field, chosen), (rejected_field, rejected)):
        if len(conversation) == shared:
            raise row_error(row, field, "has no assistant reply after the shared prompt turns")
        replies.append(assistant_messages(row, field, conversation[shared:], first_index=shared))
    return chosen[:shared], replies[0], replies[1]


def preference_from_ultrafeedback(row: Row) -> list[PreferenceExample]:
    """One UltraFeedback-binarized row; ``margin = score_chosen - score_rejected``."""
    chosen = chat_messages(row, "chosen", require(row, "chosen"))
    rejected = chat_messages(row, "rejected", require(row, "rejected"))
    prompt, chosen_reply, rejected_reply = split_shared_prompt(row, chosen, rejected)
    check_distinct(row, "chosen", chosen_reply, "rejected", rejected_reply)
    score_chosen = number(row, "score_chosen", require(row, "score_chosen"))
    score_rejected = number(row, "score_rejected", require(row, "score_rejected"))
    if score_chosen < score_rejected:
        raise row_error(
            row,
            "score_chosen",
            f"is lower than 'score_rejected' ({score_chosen} < {score_rejected})",
        )
    return [
        PreferenceExample(
            prompt,
            chosen_reply,
            rejected_reply,
            score_chosen - score_rejected,
            row.source,
            row.line,
        )
    ]


def summarize_prompt(row: Row) -> str:
    """The TL;DR prompt for a summarize-from-feedback ``info`` object.

    Reddit posts: ``SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:``
    (the layout used by the summarize-from-feedback reproductions); news rows use
    ``ARTICLE: {article}`` in place of the post. Missing subreddit/title lines are left out.
    """
    info = require(row, "info")
    if not isinstance(info, dict):
        raise row_error(row, "info", f"must be an object, got {kind_of(info)}")
    parts = []
    subreddit = info.get("subreddit")
    title = info.get("title")
    if not is_blank(subreddit):
        parts.append(f"SUBREDDIT: r/{text(row, 'info.subreddit', subreddit).strip()}")
    if not is_blank(title):
        parts.append(f"TITLE: {text(row, 'info.title', title).strip()}")
    if not is_blank(info.get("post")):
        parts.append(f"POST: {text(row, 'info.post', info['post']).strip()}")
    elif not is_blank(info.get("article")):
        parts.append(f"ARTICLE: {text(row, 'info.article', info['article']).strip()}")
    elif "post" in info:
        raise row_error(row, "info.post", "is empty")
    else:
        raise row_error(row, "info.post", "is missing")
    return "\n\n".join(parts) + "\n\nTL;DR:"


def preference_from_summarize(row: Row) -> list[PreferenceExample]:
    """One comparison row: the chosen summary against each other summary.

    Summaries become `` {text}`` (one leading space) so they follow ``TL;DR:`` as in the
    original data; the tokenizer appends EOS.
    """
    prompt: Prompt = summarize_prompt(row)
    summaries = require(row, "summaries")
    if not isinstance(summaries, (list, tuple)):
        raise row_error(
            row, "summaries", f"must be a list of {{text}} objects, got {kind_of(summaries)}"
        )
    if len(summaries) < 2:
        raise row_error(row, "summaries", f"must hold at least 2 summaries, got {len(summaries)}")
    texts = []
    for index, summary in enumerate(summaries):
        where = f"summaries[{index}]"
        if not isinstance(summary, dict):
            raise row_error(row, where, f"must be an object with 'text', got {kind_of(summary)}")
        if "text" not in summary:
            raise row_error(row, f"{where}.text", "is missing")
        texts.append(" " + text(row, f"{where}.text", summary["text"]).strip())
    choice = require(row, "choice")
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(texts):
        raise row_error(
            row,
            "choice",
            f"must be an index into 'summaries' (0 to {len(texts) - 1}), got {shown(choice)}",
        )
    examples = []
    for index, rejected in enumerate(texts):
        if index == choice:
            continue
        check_distinct(
            row, f"summaries[{choice}].text", texts[choice], f"summaries[{index}].text", rejected
        )
        examples.append(
            PreferenceExample(prompt, texts[choice], rejected, None, row.source, row.line)
        )
    return examples
