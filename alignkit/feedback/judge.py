"""The AI judge: constitutional pairwise preferences (RLAIF) and 1-10 answer grading.

A judge has a ``name``, ``choose(prompts) -> list[float]`` (P("A" is better) per
:func:`pairwise_prompt`) and ``grade(prompts) -> (N, 10) array`` (P(grade 1..10) per
:func:`grading_prompt`, NaN rows when unreadable). :class:`LocalJudge` reads them from a
local causal LM's log-probs; :class:`OpenAIJudge` parses the replies of an OpenAI-
compatible endpoint, using token log-probs when offered. Pairs are asked in both
orders (:func:`judge_both_orders`); an order-dependent verdict is dropped or a tie.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import yaml

from alignkit.errors import InputError
from alignkit.feedback.records import Item, Judgment

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")
GRADES = tuple(range(1, 11))
PAIRWISE_ANSWER_START = "The better response is ("
GRADE_ANSWER_START = "Rating: [["


# --- Constitution and prompts ---


def load_constitution(path: str | Path | None = None) -> list[str]:
    """Principles from a YAML list, a YAML mapping with ``principles:``, or a text file
    with one per line (blank lines and ``#`` comments skipped). Default: the packaged one."""
    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read constitution ({err.strerror})", path=str(path)) from None
    principles: Any
    if path.suffix in (".yaml", ".yml"):
        try:
            principles = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(f"invalid YAML ({str(err).splitlines()[0]})", path=str(path)) from None
        if isinstance(principles, dict):
            principles = principles.get("principles")
    else:
        lines = (line.strip() for line in text.splitlines())
        principles = [
            line.lstrip("-* ").strip() for line in lines if line and not line.startswith("#")
        ]
    if not isinstance(principles, list) or not all(isinstance(p, str) for p in principles):
        principles = []
    if not [p for p in principles if p.strip()]:
        raise InputError("expected a list of principles", path=str(path), field="principles")
    return [p.strip() for p in principles if p.strip()]


def render_conversation(prompt: Any) -> str:
    """A prompt (text, or a list of ``{"role", "content"}`` messages) as labeled turns."""
    if isinstance(prompt, str):
        return f"User: {prompt}"
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m['content']}" for m in prompt)


def pairwise_prompt(principle: str, prompt: Any, first: str, second: str) -> str:
    """The judge prompt showing ``first`` as (A) and ``second`` as (B)."""
    return (
        "Compare two responses of an AI assistant to the same conversation, "
        f"judged by this principle:\n{principle}\n\n"
        f"[Conversation]\n{render_conversation(prompt)}\n\n"
        f"[Response (A)]\n{first}\n\n[Response (B)]\n{second}\n\n"
        "Judged by the principle above, which response is better: (A) or (B)?"
    )


def grading_prompt(prompt: Any, answer: str, principle: str | None = None) -> str:
    """The single-answer grading prompt (1-10), optionally focused on one principle."""
    focus = f"\nGive the most weight to this principle: {principle}" if principle else ""
    return (
        "Rate the assistant's response to the conversation below on a scale from 1 "
        "(useless, wrong or harmful) to 10 (excellent). Consider helpfulness, correctness, "
        f"honesty, harmlessness, depth and clarity.{focus}\n\n"
        f"[Conversation]\n{render_conversation(prompt)}\n\n[Response]\n{answer}\n\n"
        "What is your rating from 1 to 10?"
    )


# --- Reading verdicts from reply text (and token log-probs) ---

PAIRWISE_REPLY_FORMAT = (
    "\n\nEnd your reply with the letter of the better response, written as [[A]] or [[B]]."
)
GRADE_REPLY_FORMAT = (
    "\n\nEnd your reply with your rating written as [[N]], N a whole number from 1 to 10."
)
_CHOICE_PATTERNS = (
    r"\[\[\s*([AB])\s*\]\]",
    r"^\W*([AB])\b",
    r"\(([AB])\)",
    r"\b(?:[Rr]esponse|[Aa]ssistant|[Aa]nswer)\s+\(?([AB])\)?",
)
_GRADE_PATTERNS = (
    r"\[\[\s*(\d+)\s*\]\]",
    r"(?i)rating\W{0,4}(\d+)",
    r"\b(\d+)\s*/\s*10\b",
    r"^\D*?(\d+)",
)


def _last_match(patterns: Sequence[str], text: str) -> tuple[str, int] | None:
    for pattern in patterns:
        found = list(re.finditer(pattern, text))
        if found:
            return found[-1].group(1), found[-1].start(1)
    return None


def parse_choice(text: str) -> tuple[str, int] | None:
    """("A" or "B", character offset) of the verdict in a reply, or None."""
    return _last_match(_CHOICE_PATTERNS, text)


def parse_grade(text: str) -> tuple[int, int] | None:
    """(grade 1..10, character offset) in a reply, or None."""
    found = _last_match(_GRADE_PATTERNS, text)
    if found is None or not 1 <= int(found[0]) <= 10:
        return None
    return int(found[0]), found[1]


def _alternatives_at(entries: Sequence[Any] | None, offset: int) -> dict[str, float] | None:
    """{normalised token: probability} among the top log-probs of the token at ``offset``."""
    position = 0
    for entry in entries or ():
        if position <= offset < position + len(entry.token):
            mass: dict[str, float] = {}
            options = list(entry.top_logprobs or []) or [entry]
            for alt in options:
                key = alt.token.strip().strip("[](){}*.:").strip()
                mass[key] = mass.get(key, 0.0) + math.exp(alt.logprob)
            mass["<rest>"] = max(1.0 - sum(math.exp(a.logprob) for a in options), 1e-12)
            return mass
        position += len(entry.token)
    return None


def choice_probability(text: str, entries: Sequence[Any] | None = None) -> float:
    """P(A) from a reply: from the top log-probs at the verdict token when given (a
    letter missing from them gets the unlisted mass), else 1 or 0; 0.5 if no verdict."""
    found = parse_choice(text)
    if found is None:
        return 0.5
    mass = _alternatives_at(entries, found[1])
    if mass is None or found[0] not in mass:
        return 1.0 if found[0] == "A" else 0.0
    p_a, p_b = mass.get("A", mass["<rest>"]), mass.get("B", mass["<rest>"])
    return p_a / (p_a + p_b)


def grade_distribution(text: str, entries: Sequence[Any] | None = None) -> np.ndarray:
    """(10,) P(grade = 1..10) from a reply: top log-probs at the grade token when given,
    else one-hot; all NaN when no grade is found."""
    found = parse_grade(text)
    if found is None:
        return np.full(len(GRADES), np.nan)
    dist = np.zeros(len(GRADES))
    mass = _alternatives_at(entries, found[1])
    if mass is not None and str(found[0]) in mass:
        for g in GRADES:
            dist[g - 1] = mass.get(str(g), 0.0)
    else:
        dist[found[0] - 1] = 1.0
    return dist / dist.sum()


class Judge(Protocol):
    """What :func:`judge_pairwise` and :func:`judge_grades` need from a judge."""

    name: str

    def choose(self, prompts: Sequence[str]) -> list[float]: ...

    def grade(self, prompts: Sequence[str]) -> np.ndarray: ...


# --- Judges ---


class LocalJudge:
    """A local HF causal LM as judge, read from its next-token probabilities.

    The judge prompt goes in a user turn (through the chat template when the
    tokenizer has one), the assistant turn starts with "The better response is ("
    or "Rating: [[", and the options "A"/"B" or "1]]".."10]]" are scored as
    continuations, then renormalised over the options. Prompts longer than
    ``max_prompt_tokens`` keep their last tokens.
    """

    def __init__(
        self,
        model_dir: str,
        name: str | None = None,
        max_prompt_tokens: int | None = None,
        device: Any = "cpu",
    ) -> None:
        from alignkit.models import load_policy, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir, padding_side="left")
        self.model = load_policy(model_dir, device=device).eval()
        self.device = device
        self.name = name or f"local:{Path(model_dir).name}"
        limit = getattr(self.model.config, "max_position_embeddings", 2048)
        self.max_prompt_tokens = max_prompt_tokens or limit - 16

    def _prefix_ids(self, prompt: str, answer_start: str) -> list[int]:
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = f"{prompt}\n\n"
        ids = self.tokenizer(text + answer_start, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens :]

    def option_probs(
        self, prompts: Sequence[str], answer_start: str, options: Sequence[str]
    ) -> np.ndarray:
        """(N, O) probabilities of each option continuing ``prompt + answer_start``; rows sum to 1."""
        import torch

        from alignkit.models import autocast

        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        with torch.no_grad(), autocast(self.device):
            scores = np.array(
                [
                    self._continuation_logps(self._prefix_ids(p, answer_start), option_ids)
                    for p in prompts
                ]
            ).reshape(len(prompts), len(options))
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True)

    def _continuation_logps(self, prefix: list[int], option_ids: list[list[int]]) -> np.ndarray:
        """log P(option | prefix) per option: the prefix runs once; for options longer than
        one token its KV cache is repeated over the options."""
        import torch

        device = self.device
        out = self.model(
            input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1
        )
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        totals = np.array([float(first[ids[0]]) for ids in option_ids])
        longest = max(len(ids) for ids in option_ids)
        if longest == 1:
            return totals
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(option_ids))
        pad = self.tokenizer.pad_token_id
        feed = torch.tensor(
            [ids[:-1] + [pad] * (longest - len(ids)) for ids in option_ids]
        )  # (O, L-1)
        targets = torch.tensor([ids[1:] + [pad] * (longest - len(ids)) for ids in option_ids])
        scored = torch.tensor(
            [[1] * (len(ids) - 1) + [0] * (longest - len(ids)) for ids in option_ids]
        )
        n = len(prefix)
        positions = torch.arange(n, n + longest - 1).expand(len(option_ids), -1)
        logits = (
            self.model(
                input_ids=feed.to(device),
                attention_mask=torch.ones(
                    len(option_ids), n + longest - 1, dtype=torch.long, device=device
                ),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
            )
            .logits.float()
            .cpu()
        )
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        return totals + (logps * scored).sum(-1).numpy()

    def choose(self, prompts: Sequence[str]) -> list[float]:
        """P(A) per pairwise judge prompt."""
        return self.option_probs(prompts, PAIRWISE_ANSWER_START, ["A", "B"])[:, 0].tolist()

    def grade(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, 10) probabilities of the grades 1..10."""
        return self.option_probs(prompts, GRADE_ANSWER_START, [f"{g}]]" for g in GRADES])


class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint as judge (through the ``openai`` client).

    The verdict is parsed from the reply text; when the server returns token
    log-probs, the probability is read from the alternatives at the verdict token.
    Without log-probs a parsed verdict has probability 1. Servers that reject the
    ``logprobs`` request option are retried without it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "none",
        name: str | None = None,
        max_tokens: int = 512,
        workers: int = 4,
        timeout: float = 120.0,
    ) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)
        self.model = model
        self.name = name or f"openai:{model}"
        self.max_tokens = max_tokens
        self.workers = workers
        self.use_logprobs = True

    def _ask(self, text: str) -> tuple[str, list[Any] | None]:
        """(reply text, per-token log-prob entries or None)."""
        import openai

        request = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        try:
            if self.use_logprobs:
                try:
                    reply = self.client.chat.completions.create(
                        **request, logprobs=True, top_logprobs=5
                    )
                except openai.BadRequestError:
                    self.use_logprobs = False
            if not self.use_logprobs:
                reply = self.client.chat.completions.create(**request)
        except openai.OpenAIError as err:
            raise InputError(
                f"judge request failed: {err}", path=str(self.client.base_url)
            ) from None
        choice = reply.choices[0]
        content = choice.message.content or ""
        entries = choice.logprobs.content if choice.logprobs is not None else None
        return content, entries

    def _ask_all(self, texts: Sequence[str]) -> list[tuple[str, list[Any] | None]]:
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(self._ask, texts))

    def choose(self, prompts: Sequence[str]) -> list[float]:
        """P(A) per pairwise judge prompt; 0.5 when the reply names neither response."""
        replies = self._ask_all([p + PAIRWISE_REPLY_FORMAT for p in prompts])
        return [choice_probability(text, entries) for text, entries in replies]

    def grade(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, 10) probabilities of the grades 1..10; NaN rows where no grade was found."""
        replies = self._ask_all([p + GRADE_REPLY_FORMAT for p in prompts])
        return np.array([grade_distribution(text, entries) for text, entries in replies])


# --- Both orders, and items -> judgments ---


@dataclass(frozen=True)
class PairQuestion:
    """One comparison to ask: ``first`` and ``second`` are response texts."""

    principle: str
    prompt: Any
    first: str
    second: str


@dataclass(frozen=True)
class PairVerdict:
    """The judge's answer on one pair, asked in both orders."""

    p_first_forward: float  # P(first better) with first shown as (A)
    p_first_backward: float  # P(first better) with first shown as (B)
    probability: float  # mean of the two: P(first better)
    winner: int | None  # 0 = first, 1 = second, None = order-dependent (inconsistent)

    @property
    def consistent(self) -> bool:
        return self.winner is not None


def judge_both_orders(
    choose: Callable[[list[str]], Sequence[float]], questions: Sequence[PairQuestion]
) -> list[PairVerdict]:
    """Ask every question as (first, second) and as (second, first) in one ``choose`` call.

    A side wins only if it is preferred (P > 0.5) in both orders.
    """
    forward = [pairwise_prompt(q.principle, q.prompt, q.first, q.second) for q in questions]
    backward = [pairwise_prompt(q.principle, q.prompt, q.second, q.first) for q in questions]
    p_a = list(choose(forward + backward))
    verdicts = []
    for p_a_forward, p_a_backward in zip(p_a[: len(questions)], p_a[len(questions) :], strict=True):
        p_forward, p_backward = float(p_a_forward), 1.0 - float(p_a_backward)
        if p_forward > 0.5 and p_backward > 0.5:
            winner: int | None = 0
        elif p_forward < 0.5 and p_backward < 0.5:
            winner = 1
        else:
            winner = None
        verdicts.append(PairVerdict(p_forward, p_backward, (p_forward + p_backward) / 2.0, winner))
    return verdicts


@dataclass(frozen=True)
class Comparison:
    """A verdict on completions ``first`` < ``second`` of an item, under ``principle``."""

    item_id: str
    first: int
    second: int
    principle: str
    verdict: PairVerdict


@dataclass
class PairwiseJudging:
    """What :func:`judge_pairwise` returns."""

    judgments: list[Judgment]  # one per item with a usable verdict
    comparisons: list[Comparison]  # every pair asked
    consistency_rate: float  # share of comparisons with the same verdict in both orders


def judge_pairwise(
    judge: Judge,
    items: Sequence[Item],
    principles: Sequence[str] | None = None,
    seed: int = 0,
    inconsistent: Literal["drop", "tie"] = "drop",
) -> PairwiseJudging:
    """Judge every pair of completions of every item, one sampled principle per pair.

    K = 2 gives a ``pairwise`` judgment; K > 2 a ``ranking`` by wins (a tie counts
    half). Order-dependent verdicts are dropped or count as ties (``inconsistent``).
    ``Judgment.probability`` is P(the recorded winner is better), for a ranking the
    mean over its decided pairs; a K = 2 tie records P(completion 0 is better).
    """
    if inconsistent not in ("drop", "tie"):
        raise InputError(
            f"inconsistent must be 'drop' or 'tie', got {inconsistent!r}", field="inconsistent"
        )
    principles = list(principles) if principles is not None else load_constitution()
    rng = random.Random(seed)
    asked: list[tuple[Item, int, int, str]] = []
    for item in items:
        if len(item.completions) < 2:
            raise InputError("an item needs at least 2 completions to compare", path=item.item_id)
        for i, j in combinations(range(len(item.completions)), 2):
            asked.append((item, i, j, rng.choice(principles)))
    questions = [
        PairQuestion(p, item.prompt, item.completions[i], item.completions[j])
        for item, i, j, p in asked
    ]
    verdicts = judge_both_orders(judge.choose, questions) if questions else []
    comparisons = [
        Comparison(item.item_id, i, j, p, v)
        for (item, i, j, p), v in zip(asked, verdicts, strict=True)
    ]

    by_item: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_item[c.item_id].append(c)
    judgments = []
    for item in items:
        judgment = _judgment_from_comparisons(item, by_item[item.item_id], judge.name, inconsistent)
        judgments += [judgment] if judgment is not None else []
    rate = float(np.mean([c.verdict.consistent for c in comparisons] or [np.nan]))
    return PairwiseJudging(judgments, comparisons, rate)


def _judgment_from_comparisons(
    item: Item, comparisons: list[Comparison], annotator: str, inconsistent: str
) -> Judgment | None:
    usable = [c for c in comparisons if c.verdict.consistent or inconsistent == "tie"]
    if not usable:
        return None
    wins = np.zeros(len(item.completions))
    decided = []
    for c in usable:
        v = c.verdict
        if v.winner is None:
            wins[[c.first, c.second]] += 0.5
        else:
            wins[c.first if v.winner == 0 else c.second] += 1.0
            decided.append(v.probability if v.winner == 0 else 1.0 - v.probability)
    ranked = sorted(set(wins.tolist()), reverse=True)
    ranking = tuple(tuple(int(i) for i in np.nonzero(wins == w)[0]) for w in ranked)
    if len(item.completions) == 2:
        probability = decided[0] if decided else usable[0].verdict.probability
    else:
        probability = float(np.mean(decided)) if decided else 0.5
    return Judgment(
        item_id=item.item_id,
        annotator=annotator,
        kind="pairwise" if len(item.completions) == 2 else "ranking",
        ranking=ranking,
        source="ai",
        created_at=time.time(),
        probability=float(probability),
    )


@dataclass(frozen=True)
class Grade:
    """One graded completion: the distribution over 1..10 and its summaries."""

    item_id: str
    completion: int
    principle: str | None
    probs: tuple[float, ...]  # P(grade = 1..10); NaN when the judge gave no grade
    expected: float  # sum g * P(g)
    grade: int  # most likely grade (0 when none)


@dataclass
class GradeJudging:
    """What :func:`judge_grades` returns."""

    judgments: list[Judgment]  # kind "likert", ratings = most likely grade 1..10 per completion
    grades: list[Grade]
    n_unparsed: int  # completions the judge gave no readable grade for


def judge_grades(
    judge: Judge, items: Sequence[Item], principles: Sequence[str] | None = None, seed: int = 0
) -> GradeJudging:
    """Single-answer grading (MT-Bench style) of every completion of every item on 1..10.

    With ``principles``, one sampled principle per completion is added to the prompt.
    """
    rng = random.Random(seed)
    asked = [
        (item, k, rng.choice(list(principles)) if principles else None)
        for item in items
        for k in range(len(item.completions))
    ]
    dists = (
        judge.grade([grading_prompt(item.prompt, item.completions[k], p) for item, k, p in asked])
        if asked
        else np.zeros((0, 10))
    )
    grades, ratings = [], {}
    for (item, k, principle), dist in zip(asked, np.asarray(dists, dtype=float), strict=True):
        readable = bool(np.isfinite(dist).all())
        best = int(GRADES[int(np.argmax(dist))]) if readable else 0
        expected = float(np.dot(GRADES, dist)) if readable else float("nan")
        grades.append(Grade(item.item_id, k, principle, tuple(dist.tolist()), expected, best))
        if readable:
            ratings.setdefault(item.item_id, {})[k] = float(best)
    judgments = [
        Judgment(
            item_id=item.item_id,
            annotator=judge.name,
            kind="likert",
            ratings=ratings[item.item_id],
            source="ai",
            created_at=time.time(),
        )
        for item in items
        if item.item_id in ratings
    ]
    return GradeJudging(judgments, grades, sum(1 for g in grades if g.grade == 0))
