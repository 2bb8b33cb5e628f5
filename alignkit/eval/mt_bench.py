"""MT-Bench questions and answers: reading, generating, and the conversations a judge sees.

A question file has one JSON object per line: ``question_id`` (int or str), ``category``
(str), ``turns`` (list of user messages) and optionally ``reference`` (list of reference
answers, one per turn; MT-Bench gives them for math, reasoning and coding). An answer
file has ``{"question_id", "answer"}`` rows, ``answer`` being one string (turn 1) or a
list of strings (one per turn); FastChat's ``{"question_id", "choices": [{"turns": [...]}]}``
is read too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import InputError
from alignkit.feedback.judge import render_conversation
from alignkit.jsonl import jsonl_lines

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: its user turns and optional reference answers."""

    question_id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()


def _json_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=str(path))
    rows = []
    for number, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"invalid JSON ({err.msg})", path=str(path), line=number) from None
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", path=str(path), line=number)
        rows.append((number, row))
    if not rows:
        raise InputError("no rows", path=str(path))
    return rows


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_questions(path: str | Path, max_questions: int = 0) -> list[Question]:
    """Questions of an MT-Bench file (the first ``max_questions`` when > 0)."""
    questions, seen = [], set()
    for number, row in _json_lines(path):
        where = {"path": str(path), "line": number}
        qid = row.get("question_id")
        if not isinstance(qid, int | str) or isinstance(qid, bool) or str(qid) == "":
            raise InputError("must be an integer or a string", field="question_id", **where)
        if str(qid) in seen:
            raise InputError(f"question {qid} appears twice", field="question_id", **where)
        if not isinstance(row.get("category", ""), str):
            raise InputError("must be a string", field="category", **where)
        turns = row.get("turns")
        if not _strings(turns) or not turns or not all(t.strip() for t in turns):
            raise InputError(
                "must be a non-empty list of non-empty strings", field="turns", **where
            )
        reference = row.get("reference") or []
        if not _strings(reference):
            raise InputError("must be a list of strings", field="reference", **where)
        seen.add(str(qid))
        questions.append(
            Question(str(qid), row.get("category", ""), tuple(turns), tuple(reference))
        )
    return questions[:max_questions] if max_questions > 0 else questions


def read_answers(path: str | Path, questions: Sequence[Question], turns: int) -> list[list[str]]:
    """Answers to ``questions`` (first ``turns`` turns each), in question order."""
    by_id: dict[str, list[str]] = {}
    for number, row in _json_lines(path):
        where = {"path": str(path), "line": number}
        qid = row.get("question_id")
        if qid is None:
            raise InputError("is required", field="question_id", **where)
        if "answer" in row:
            answer = row["answer"]
            answer = [answer] if isinstance(answer, str) else answer
        elif isinstance(row.get("choices"), list) and row["choices"]:
            answer = (row["choices"][0] or {}).get("turns")
        else:
            raise InputError("is required (a string or a list of strings)", field="answer", **where)
        if not _strings(answer) or not answer:
            raise InputError("must be a string or a list of strings", field="answer", **where)
        by_id[str(qid)] = list(answer)
    answers = []
    for question in questions:
        found = by_id.get(question.question_id)
        if found is None:
            raise InputError(f"has no answer to question {question.question_id}", path=str(path))
        if len(found) < turns:
            raise InputError(
                f"answers {len(found)} turn(s) of question {question.question_id}, {turns} needed",
                path=str(path),
            )
        answers.append(found[:turns])
    return answers


def check_turns(questions: Sequence[Question], turns: int) -> None:
    """Every question must have at least ``turns`` user turns."""
    if turns < 1:
        raise InputError(f"must be >= 1, got {turns}", field="--turns")
    short = [q.question_id for q in questions if len(q.turns) < turns]
    if short:
        raise InputError(f"question {short[0]} has fewer than {turns} turns", field="--turns")


def conversation(question: Question, answers: Sequence[str], turn: int) -> Conversation:
    """The chat up to user turn ``turn`` (1-based), with ``answers`` to the earlier turns."""
    messages: Conversation = []
    for index in range(turn):
        messages.append({"role": "user", "content": question.turns[index]})
        if index < turn - 1:
            messages.append({"role": "assistant", "content": answers[index]})
    return messages


def pairwise_view(
    question: Question, answers: Sequence[str], turn: int
) -> tuple[Conversation, str]:
    """(the chat a pairwise judge sees, one side's response) at user turn ``turn``.

    Turn 1: the question, and the answer. Later turns (MT-Bench's multi-turn pairwise
    format): the first question, and the side's whole conversation from its first
    answer on, so each side is read with its own earlier answers.
    """
    chat: Conversation = [{"role": "user", "content": question.turns[0]}]
    response = answers[0]
    for index in range(1, turn):
        response += f"\n\nUser: {question.turns[index]}\n\nAssistant: {answers[index]}"
    return chat, response


def insert_reference(judge_prompt: str, chat: Conversation, reference: str | None) -> str:
    """``judge_prompt`` with a ``[Reference answer]`` block right after the conversation."""
    if not reference:
        return judge_prompt
    block = f"[Conversation]\n{render_conversation(chat)}\n\n"
    position = judge_prompt.find(block)
    if position < 0:
        raise ValueError("the judge prompt does not contain the conversation block")
    cut = position + len(block)
    return f"{judge_prompt[:cut]}[Reference answer]\n{reference}\n\n{judge_prompt[cut:]}"


def reference_for(question: Question, turn: int) -> str | None:
    """The reference answer of a turn (1-based), if the question has one."""
    return question.reference[turn - 1] if len(question.reference) >= turn else None


def generate_answers(
    model_dir: str,
    questions: Sequence[Question],
    turns: int,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    device: Any = "cpu",
) -> list[list[str]]:
    """Greedy answers of a local model (on ``device``) to every turn (turn 2 sees its own
    turn-1 answer)."""
    from alignkit.models import load_policy, load_tokenizer
    from alignkit.recipes.online import encode_prompts
    from alignkit.rollout import SamplingParams, generate

    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir, device=device).eval().requires_grad_(False)
    limit = getattr(model.config, "max_position_embeddings", 2048) - max_new_tokens
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(1, turns + 1):
        chats = [conversation(q, answers[i], turn) for i, q in enumerate(questions)]
        ids = encode_prompts(tokenizer, chats, max(16, limit))
        for start in range(0, len(ids), batch_size):
            rollout = generate(model, tokenizer, ids[start : start + batch_size], params)
            for offset, text in enumerate(rollout.completions):
                answers[start + offset].append(text.strip())
    return answers
