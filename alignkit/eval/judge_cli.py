"""LLM-as-judge: MT-Bench pairwise and 1-10 grading, and AI labels into the feedback store."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.errors import InputError

MT_BENCH_PRINCIPLE = (
    "Prefer the response that follows the user's instructions and answers the question "
    "better: more helpful, relevant, accurate, deep, creative and detailed."
)
LATER_TURN_FOCUS = " Judge the answers to the user's last question."
DEFAULT_ANNOTATOR = "ai-judge"
_DEVICE_HELP = (
    "local models' device: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), "
    "cpu, cuda, cuda:N"
)


def _add_judge_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("judge (a local model or an OpenAI-compatible endpoint)")
    group.add_argument("--judge-model", help="local HF causal LM directory")
    group.add_argument("--openai-base-url", help="e.g. http://localhost:8000/v1")
    group.add_argument("--openai-model", help="model name at the endpoint")
    group.add_argument(
        "--openai-api-key-env", default="OPENAI_API_KEY", help="variable holding the API key"
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help=_DEVICE_HELP)


def _add_mt_bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", required=True, help="MT-Bench question JSONL")
    parser.add_argument("--turns", type=int, default=1, help="judge turns 1..N (default 1)")
    parser.add_argument("--max-questions", type=int, default=0, help="first N; 0 = all")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="when generating")
    parser.add_argument("--output", required=True, help="output JSON path")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``alignkit judge pairwise|grade|label``."""
    sub = parser.add_subparsers(dest="judge_command", metavar="SUBCOMMAND", required=True)
    pairwise = sub.add_parser("pairwise", help="A vs B on MT-Bench questions, both orders")
    _add_mt_bench_options(pairwise)
    for side in ("a", "b"):
        pairwise.add_argument(f"--answers-{side}", help=f"answer JSONL of model {side.upper()}")
        pairwise.add_argument(f"--model-{side}", help=f"or generate {side.upper()}'s answers")
        pairwise.add_argument(f"--name-{side}", default=side.upper())
    pairwise.add_argument("--principle", default=MT_BENCH_PRINCIPLE, help="the judge's criterion")
    _add_judge_options(pairwise)

    grade = sub.add_parser("grade", help="grade answers 1-10 (MT-Bench single-answer grading)")
    _add_mt_bench_options(grade)
    grade.add_argument("--answers", help="answer JSONL")
    grade.add_argument("--model", help="or generate the answers with this model")
    grade.add_argument("--name", default="model")
    _add_judge_options(grade)

    label = sub.add_parser("label", help="the constitutional AI judge labels a store project")
    label.add_argument("--db", default=os.environ.get("ALIGNKIT_LABEL_DB"), required=False)
    label.add_argument("--project", required=True, help="project name or id")
    label.add_argument("--constitution", help="principles file (YAML list or one per line)")
    label.add_argument("--inconsistent", choices=["drop", "tie"], default="drop")
    label.add_argument("--annotator", default=DEFAULT_ANNOTATOR, help="store user name")
    label.add_argument("--batch-size", type=int, default=16, help="items leased per batch")
    label.add_argument("--max-items", type=int, default=0, help="stop after N items; 0 = all")
    _add_judge_options(label)


def make_judge(
    judge_model: str | None = None,
    openai_base_url: str | None = None,
    openai_model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    device: Any = "cpu",
) -> Any:
    """A :class:`LocalJudge` (on ``device``) or an :class:`OpenAIJudge`; exactly one kind
    must be given."""
    from alignkit.feedback.judge import LocalJudge, OpenAIJudge

    if judge_model and (openai_base_url or openai_model):
        raise InputError("give --judge-model or --openai-base-url, not both", field="judge")
    if judge_model:
        path = Path(judge_model)
        if not (path / "config.json").is_file():
            raise InputError("not a model directory (no config.json)", path=judge_model)
        return LocalJudge(judge_model, device=device)
    if openai_base_url and openai_model:
        api_key = os.environ.get(api_key_env, "none")
        return OpenAIJudge(openai_base_url, openai_model, api_key=api_key)
    raise InputError(
        "give --judge-model DIR, or --openai-base-url URL and --openai-model NAME", field="judge"
    )


def _device(args: argparse.Namespace) -> Any:
    """The local models' device (``--device``)."""
    from alignkit.models import resolve_device

    return resolve_device(getattr(args, "device", "auto"), key="--device", source="command line")


def _judge_from(args: argparse.Namespace) -> Any:
    return make_judge(
        args.judge_model,
        args.openai_base_url,
        args.openai_model,
        args.openai_api_key_env,
        device=_device(args),
    )


def _answers(
    questions: list,
    turns: int,
    answers: str | None,
    model: str | None,
    side: str,
    tokens: int,
    device: Any = "cpu",
) -> list[list[str]]:
    from alignkit.eval.mt_bench import generate_answers, read_answers

    _check_answer_source(answers, model, side)
    if answers:
        return read_answers(answers, questions, turns)
    return generate_answers(model, questions, turns, max_new_tokens=tokens, device=device)


def _check_answer_source(answers: str | None, model: str | None, side: str) -> None:
    """Exactly one of an answer file and a model directory."""
    if bool(answers) == bool(model):
        raise InputError("give an answer file or a model directory (one of them)", field=side)
    if model and not (Path(model) / "config.json").is_file():
        raise InputError("not a model directory (no config.json)", path=model, field=side)


def _write(result: dict[str, Any], output: str) -> None:
    from alignkit.eval.cli import write_json
    from alignkit.eval.evaluate import json_ready

    write_json(json_ready(result), Path(output))
    print(f"wrote {output}")


def _check_output(path: str) -> None:
    from alignkit.eval.cli import _check_output as check

    check(path)


def _cmd_pairwise(args: argparse.Namespace) -> int:
    from alignkit.eval.mt_bench import (
        check_turns,
        insert_reference,
        pairwise_view,
        read_questions,
        reference_for,
    )
    from alignkit.eval.stats import count_outcomes
    from alignkit.feedback.judge import PairQuestion, judge_both_orders

    # 0. validate every input, then load models
    _check_output(args.output)
    questions = read_questions(args.questions, args.max_questions)
    check_turns(questions, args.turns)
    _check_answer_source(args.answers_a, args.model_a, "--answers-a")
    _check_answer_source(args.answers_b, args.model_b, "--answers-b")
    judge = _judge_from(args)
    n_tokens = args.max_new_tokens
    device = _device(args)
    answers_a = _answers(
        questions, args.turns, args.answers_a, args.model_a, "--answers-a", n_tokens, device
    )
    answers_b = _answers(
        questions, args.turns, args.answers_b, args.model_b, "--answers-b", n_tokens, device
    )
    # 1. one question per (question, turn): the chat so far and the two answers
    asked, chats, references = [], [], []
    for q, mine, theirs in zip(questions, answers_a, answers_b, strict=True):
        for turn in range(1, args.turns + 1):
            chat, response_a = pairwise_view(q, mine, turn)
            _, response_b = pairwise_view(q, theirs, turn)
            principle = args.principle + (LATER_TURN_FOCUS if turn > 1 else "")
            asked.append((q, turn, PairQuestion(principle, chat, response_a, response_b)))
            chats.append(chat)
            references.append(reference_for(q, turn))

    # 2. both orders in one call; the reference answer (if any) is shown after the chat
    def choose(texts: list[str]) -> list[float]:
        paired = [(chats[i % len(chats)], references[i % len(chats)]) for i in range(len(texts))]
        return judge.choose(
            [insert_reference(t, c, r) for t, (c, r) in zip(texts, paired, strict=True)]
        )

    verdicts = judge_both_orders(choose, [question for _, _, question in asked])
    # 3. A's win rate: an order-dependent verdict is a tie (MT-Bench's convention)
    coded = np.array([0.5 if v.winner is None else 1.0 - v.winner for v in verdicts])
    counts = count_outcomes(coded)
    low, high = counts.wilson()
    by_category: dict[str, list[float]] = defaultdict(list)
    comparisons = []
    for (q, turn, _), verdict, outcome in zip(asked, verdicts, coded, strict=True):
        by_category[q.category].append(outcome)
        winner = {0: "a", 1: "b", None: "inconsistent"}[verdict.winner]
        comparisons.append(
            {
                "question_id": q.question_id,
                "category": q.category,
                "turn": turn,
                "p_a_a_shown_first": verdict.p_first_forward,
                "p_a_a_shown_second": verdict.p_first_backward,
                "p_a": verdict.probability,
                "winner": winner,
            }
        )
    consistency = float(np.mean([v.consistent for v in verdicts])) if verdicts else float("nan")
    result = {
        "judge": judge.name,
        "principle": args.principle,
        "models": {"a": args.name_a, "b": args.name_b},
        "turns": args.turns,
        "summary": {
            "win_rate_a": counts.win_rate,
            "low": low,
            "high": high,
            "wins_a": counts.wins,
            "wins_b": counts.losses,
            "ties": counts.ties,
            "n": counts.n,
            "consistency_rate": consistency,
        },
        "by_category": {
            c: {"win_rate_a": float(np.mean(v)), "n": len(v)}
            for c, v in sorted(by_category.items())
        },
        "comparisons": comparisons,
    }
    _write(result, args.output)
    print(
        f"{args.name_a} vs {args.name_b}: win rate {counts.win_rate:.3f} [{low:.3f}, {high:.3f}] "
        f"over {counts.n} comparisons; judge consistency {consistency:.3f}"
    )
    return 0


def _cmd_grade(args: argparse.Namespace) -> int:
    from alignkit.eval.mt_bench import (
        check_turns,
        conversation,
        insert_reference,
        read_questions,
        reference_for,
    )
    from alignkit.feedback.judge import GRADES, grading_prompt

    _check_output(args.output)
    questions = read_questions(args.questions, args.max_questions)
    check_turns(questions, args.turns)
    _check_answer_source(args.answers, args.model, "--answers")
    judge = _judge_from(args)
    answers = _answers(
        questions,
        args.turns,
        args.answers,
        args.model,
        "--answers",
        args.max_new_tokens,
        _device(args),
    )
    asked, prompts = [], []
    for q, mine in zip(questions, answers, strict=True):
        for turn in range(1, args.turns + 1):
            chat = conversation(q, mine, turn)
            text = grading_prompt(chat, mine[turn - 1])
            prompts.append(insert_reference(text, chat, reference_for(q, turn)))
            asked.append((q, turn))
    dists = np.asarray(judge.grade(prompts), dtype=float) if prompts else np.zeros((0, 10))
    grades, by_category = [], defaultdict(list)
    for (q, turn), dist in zip(asked, dists, strict=True):
        readable = bool(np.isfinite(dist).all())
        grade = int(GRADES[int(np.argmax(dist))]) if readable else None
        expected = float(np.dot(GRADES, dist)) if readable else None
        if readable:
            by_category[q.category].append(expected)
        grades.append(
            {
                "question_id": q.question_id,
                "category": q.category,
                "turn": turn,
                "grade": grade,
                "expected_grade": expected,
                "probs": dist.tolist(),
            }
        )
    readable = [g for g in grades if g["grade"] is not None]
    result = {
        "judge": judge.name,
        "model": args.name,
        "turns": args.turns,
        "summary": {
            "mean_grade": float(np.mean([g["grade"] for g in readable])) if readable else None,
            "mean_expected_grade": float(np.mean([g["expected_grade"] for g in readable]))
            if readable
            else None,
            "n": len(grades),
            "n_unparsed": len(grades) - len(readable),
        },
        "by_category": {
            c: {"mean_expected_grade": float(np.mean(v)), "n": len(v)}
            for c, v in sorted(by_category.items())
        },
        "grades": grades,
    }
    _write(result, args.output)
    summary = result["summary"]
    print(f"{args.name}: mean grade {summary['mean_grade']} over {summary['n']} answers")
    return 0


def label_project(
    store: Any,
    project: str,
    judge: Any,
    principles: list[str],
    annotator: str = DEFAULT_ANNOTATOR,
    inconsistent: str = "drop",
    batch_size: int = 16,
    max_items: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Lease, judge and submit every item the annotator may still judge; returns counts.

    Items whose overlap is full or that this annotator already judged are passed over.
    An item whose verdict is dropped (order-dependent, ``inconsistent="drop"``) is
    skipped in the store, so its slot goes back to the pool.
    """
    from alignkit.feedback.accounts import ensure_user
    from alignkit.feedback.judge import judge_pairwise
    from alignkit.feedback.queries import StoreError

    info = store.project(project)
    if info.kind not in ("pairwise", "ranking"):
        raise InputError(
            f"project {info.name!r} is {info.kind}; the AI judge labels pairwise and ranking "
            "projects (grade answers to a JSON file with 'alignkit judge grade')",
            field="--project",
        )
    ensure_user(store, annotator)
    items = store.items(info.id)
    if max_items > 0:
        items = items[:max_items]
    counts = {"labeled": 0, "dropped": 0, "passed": 0, "comparisons": 0, "consistent": 0}
    for start in range(0, len(items), batch_size):
        leased = []
        for item in items[start : start + batch_size]:
            try:
                store.lease_item(info.id, annotator, item.item_id)
                leased.append(item)
            except StoreError:
                counts["passed"] += 1
        if not leased:
            continue
        judged = judge_pairwise(judge, leased, principles, seed + start, inconsistent)
        counts["comparisons"] += len(judged.comparisons)
        counts["consistent"] += sum(c.verdict.consistent for c in judged.comparisons)
        done = set()
        for judgment in judged.judgments:
            store.submit_judgment(
                info.id, annotator, dataclasses.replace(judgment, annotator=annotator, source="ai")
            )
            done.add(judgment.item_id)
            counts["labeled"] += 1
        for item in leased:
            if item.item_id not in done:
                store.skip(info.id, annotator, item.item_id)
                counts["dropped"] += 1
    comparisons = counts["comparisons"]
    counts["consistency_rate"] = counts["consistent"] / comparisons if comparisons else None
    return counts


def _cmd_label(args: argparse.Namespace) -> int:
    from alignkit.feedback.judge import load_constitution
    from alignkit.feedback.store import Store

    if not args.db:
        raise InputError("is required (or set ALIGNKIT_LABEL_DB)", field="--db")
    if args.batch_size < 1:
        raise InputError("must be >= 1", field="--batch-size")
    principles = load_constitution(args.constitution)
    store = Store(args.db)
    store.project(args.project)  # NotFound before any model loads
    judge = _judge_from(args)
    counts = label_project(
        store, args.project, judge, principles, args.annotator, args.inconsistent,
        args.batch_size, args.max_items, args.seed,
    )  # fmt: skip
    rate = counts["consistency_rate"]
    print(
        f"{args.annotator}: labeled {counts['labeled']} items of {args.project!r} "
        f"({counts['dropped']} order-dependent verdicts dropped, {counts['passed']} items "
        f"already judged or full); consistency " + ("n/a" if rate is None else f"{rate:.3f}")
    )
    return 0


COMMANDS = {"pairwise": _cmd_pairwise, "grade": _cmd_grade, "label": _cmd_label}


def main(args: argparse.Namespace) -> int:
    """Run one ``alignkit judge`` subcommand."""
    _device(args)  # a bad --device is refused before any input is read or file written
    return COMMANDS[args.judge_command](args)
