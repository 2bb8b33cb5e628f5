"""The AI judge: prompts, both-order logic, a local tiny LM, and a real local HTTP endpoint."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignkit.errors import InputError
from alignkit.feedback.agreement import validate_judgments
from alignkit.feedback.judge import (
    GRADE_ANSWER_START,
    LocalJudge,
    OpenAIJudge,
    PairQuestion,
    choice_probability,
    grade_distribution,
    grading_prompt,
    judge_both_orders,
    judge_grades,
    judge_pairwise,
    load_constitution,
    pairwise_prompt,
    parse_choice,
    parse_grade,
)
from alignkit.feedback.records import Item
from alignkit.models import autocast

# --- Constitution and prompts ---


def test_default_constitution_and_other_formats(tmp_path):
    principles = load_constitution()
    assert 14 <= len(principles) <= 18 and len(set(principles)) == len(principles)
    assert all(p.startswith("Prefer the response") for p in principles)
    listed = tmp_path / "list.yaml"
    listed.write_text("- Be brief.\n- Be kind.\n")
    assert load_constitution(listed) == ["Be brief.", "Be kind."]
    text = tmp_path / "mine.txt"
    text.write_text("# my rules\nBe brief.\n\n- Cite sources.\n")
    assert load_constitution(text) == ["Be brief.", "Cite sources."]
    empty = tmp_path / "empty.yaml"
    empty.write_text("principles: []\n")
    with pytest.raises(InputError, match="list of principles"):
        load_constitution(empty)
    with pytest.raises(InputError, match="cannot read"):
        load_constitution(tmp_path / "missing.yaml")


def test_pairwise_prompt_shows_principle_and_both_responses_in_the_asked_order():
    principle = "Prefer the response that is more honest."
    chat = [{"role": "user", "content": "Is the moon made of cheese?"}]
    prompt = pairwise_prompt(principle, chat, "FIRST-RESPONSE", "SECOND-RESPONSE")
    assert principle in prompt and "User: Is the moon made of cheese?" in prompt
    assert prompt.index("[Response (A)]") < prompt.index("FIRST-RESPONSE")
    assert (
        prompt.index("FIRST-RESPONSE")
        < prompt.index("[Response (B)]")
        < prompt.index("SECOND-RESPONSE")
    )
    assert prompt.rstrip().endswith("(A) or (B)?")
    swapped = pairwise_prompt(principle, chat, "SECOND-RESPONSE", "FIRST-RESPONSE")
    assert swapped.index("SECOND-RESPONSE") < swapped.index("FIRST-RESPONSE")
    graded = grading_prompt("What is 2+2?", "Four.", principle)
    assert "Four." in graded and principle in graded and "1 to 10" in graded


# --- Both orders (a fake judge function, only inside this unit test) ---


def test_judge_both_orders_keeps_consistent_verdicts_and_reports_position_bias():
    questions = [
        PairQuestion("Be polite.", "hi", "good reply", "bad reply"),
        PairQuestion("Be polite.", "hi", "bad reply", "good reply"),
    ]
    asked = []

    def prefers_good(prompts):
        asked.extend(prompts)
        out = []
        for p in prompts:
            shown_first = p.split("[Response (A)]")[1].split("[Response (B)]")[0]
            out.append(0.8 if "good" in shown_first else 0.2)
        return out

    verdicts = judge_both_orders(prefers_good, questions)
    assert len(asked) == 4
    assert asked[0].index("good reply") < asked[0].index("bad reply")  # forward: first as (A)
    assert asked[2].index("bad reply") < asked[2].index("good reply")  # backward: swapped
    assert [v.winner for v in verdicts] == [0, 1]
    assert verdicts[0].p_first_forward == 0.8 and verdicts[0].p_first_backward == pytest.approx(0.8)
    assert verdicts[1].probability == pytest.approx(0.2) and all(v.consistent for v in verdicts)

    def always_a(prompts):
        return [0.9] * len(prompts)

    biased = judge_both_orders(always_a, questions)
    assert all(not v.consistent and v.winner is None for v in biased)
    assert biased[0].p_first_forward == 0.9 and biased[0].p_first_backward == pytest.approx(0.1)
    assert biased[0].probability == pytest.approx(0.5)


# --- Reading replies ---


def entry(token, logprob, alternatives=()):
    top = [SimpleNamespace(token=t, logprob=lp) for t, lp in alternatives]
    return SimpleNamespace(token=token, logprob=logprob, top_logprobs=top)


def test_parsing_replies_and_logprobs():
    assert parse_choice("[[B]]") == ("B", 2)
    assert parse_choice("A") == ("A", 0)
    assert parse_choice("Response (A) is fine but overall [[B]]")[0] == "B"
    assert parse_choice("I cannot decide.") is None
    assert parse_grade("Rating: [[7]]") == (7, 10)
    assert parse_grade("I'd say 8/10.")[0] == 8
    assert parse_grade("[[11]]") is None and parse_grade("no idea") is None
    assert choice_probability("no verdict") == 0.5
    assert choice_probability("[[B]]") == 0.0
    entries = [
        entry("[[", -0.01),
        entry("B", math.log(0.7), [("B", math.log(0.7)), (" A", math.log(0.2))]),
        entry("]]", 0.0),
    ]
    assert choice_probability("[[B]]", entries) == pytest.approx(0.2 / 0.9)
    grade_entries = [
        entry("[[", 0.0),
        entry("7", math.log(0.6), [("7", math.log(0.6)), ("8", math.log(0.3))]),
    ]
    dist = grade_distribution("[[7", grade_entries)
    assert dist[6] == pytest.approx(2 / 3) and dist[7] == pytest.approx(1 / 3)
    assert np.isnan(grade_distribution("none")).all()


# --- Local judge on the tiny random model ---


@pytest.fixture(scope="module")
def local_judge(tiny_model):
    # One thread: on the shared 2-core machine, two OpenMP threads on a 64-wide model
    # spend their time waiting for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LocalJudge(tiny_model, name="tiny-judge")
    torch.set_num_threads(threads)


def test_local_judge_probabilities_sum_to_one_and_every_item_is_judged(local_judge):
    probs = local_judge.option_probs(
        ["Which?", "Pick one, (A) or (B)?"], "The better response is (", ["A", "B"]
    )
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1.0)
    assert ((probs > 0) & (probs < 1)).all()
    items = [
        Item("a", "What is 2+2?", ("4", "5")),
        Item("b", [{"role": "user", "content": "Say hi."}], ("Hi!", "No.")),
        Item("c", "Name a colour.", ("Blue.", "Seven.", "I refuse.")),
    ]
    result = judge_pairwise(local_judge, items, seed=1, inconsistent="tie")
    assert [j.item_id for j in result.judgments] == ["a", "b", "c"]
    validate_judgments(items, result.judgments)
    assert len(result.comparisons) == 1 + 1 + 3
    assert 0.0 <= result.consistency_rate <= 1.0
    assert result.consistency_rate == np.mean([c.verdict.consistent for c in result.comparisons])
    for j in result.judgments:
        assert j.source == "ai" and j.annotator == "tiny-judge" and 0.0 <= j.probability <= 1.0
    assert [j.kind for j in result.judgments] == ["pairwise", "pairwise", "ranking"]
    principles = set(load_constitution())
    assert all(c.principle in principles for c in result.comparisons)
    again = judge_pairwise(local_judge, items, seed=1, inconsistent="drop")
    assert [c.principle for c in again.comparisons] == [c.principle for c in result.comparisons]
    consistent_items = {c.item_id for c in again.comparisons if c.verdict.consistent}
    assert {j.item_id for j in again.judgments} == consistent_items


def test_local_judge_grades_with_a_cached_prefix_equal_to_full_scoring(local_judge):
    prompt = grading_prompt("What is 2+2?", "4")
    dist = local_judge.grade([prompt])[0]
    assert dist.shape == (10,) and dist.sum() == pytest.approx(1.0)
    prefix = local_judge._prefix_ids(prompt, GRADE_ANSWER_START)
    full = []
    with torch.no_grad(), autocast():
        for grade in range(1, 11):
            option = local_judge.tokenizer(f"{grade}]]", add_special_tokens=False)["input_ids"]
            logits = local_judge.model(input_ids=torch.tensor([prefix + option])).logits[0].float()
            logps = torch.log_softmax(logits, dim=-1)
            full.append(sum(float(logps[len(prefix) - 1 + k, t]) for k, t in enumerate(option)))
    expected = np.exp(np.array(full) - max(full))
    assert dist == pytest.approx(expected / expected.sum(), abs=2e-3)
    items = [Item("g", "What is 2+2?", ("4", "5"))]
    graded = judge_grades(local_judge, items)
    assert graded.n_unparsed == 0 and len(graded.grades) == 2
    (judgment,) = graded.judgments
    assert judgment.kind == "likert" and set(judgment.ratings) == {0, 1}
    assert all(1 <= v <= 10 for v in judgment.ratings.values())
    assert graded.grades[0].expected == pytest.approx(
        float(np.dot(range(1, 11), graded.grades[0].probs))
    )


# --- OpenAI-compatible endpoint: a real HTTP server on 127.0.0.1 ---


class JudgeServer(BaseHTTPRequestHandler):
    """Prefers the response that says "please"; grades 7 (0.6) / 8 (0.3) / 6 (0.1)."""

    requests: list[dict] = []
    offer_logprobs = True

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "no such route", "type": "not_found"}})
        type(self).requests.append(body)
        if body.get("logprobs") and not type(self).offer_logprobs:
            return self._send(
                400,
                {"error": {"message": "logprobs not supported", "type": "invalid_request_error"}},
            )
        text = body["messages"][-1]["content"]
        if "[Response (A)]" in text:
            first = text.split("[Response (A)]")[1].split("[Response (B)]")[0]
            letter, other = ("A", "B") if "please" in first else ("B", "A")
            tokens = [
                ("[[", 0.0, []),
                (letter, math.log(0.8), [(letter, math.log(0.8)), (other, math.log(0.2))]),
                ("]]", 0.0, []),
            ]
        else:
            tokens = [
                ("Rating: ", 0.0, []),
                ("[[", 0.0, []),
                (
                    "7",
                    math.log(0.6),
                    [("7", math.log(0.6)), ("8", math.log(0.3)), ("6", math.log(0.1))],
                ),
                ("]]", 0.0, []),
            ]
        content = "".join(t for t, _, _ in tokens)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {
                        "token": t,
                        "logprob": lp,
                        "bytes": list(t.encode()),
                        "top_logprobs": [
                            {"token": a, "logprob": alp, "bytes": list(a.encode())}
                            for a, alp in top
                        ],
                    }
                    for t, lp, top in tokens
                ]
            }
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "usage": usage,
            },
        )

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    JudgeServer.requests = []
    JudgeServer.offer_logprobs = True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), JudgeServer)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def polite_items():
    return [
        Item("x", "Ask for salt.", ("Pass the salt, please.", "Salt. Now.")),
        Item("y", "Ask for water.", ("Water!", "Could I have water, please?")),
    ]


def test_openai_judge_against_a_local_server_with_logprobs(server):
    judge = OpenAIJudge(server, model="judge-model", api_key="test", workers=2)
    result = judge_pairwise(judge, polite_items(), seed=0)
    assert len(JudgeServer.requests) == 4 and JudgeServer.requests[0]["model"] == "judge-model"
    assert result.consistency_rate == 1.0
    winners = {j.item_id: j.ranking[0][0] for j in result.judgments}
    assert winners == {"x": 0, "y": 1}
    assert all(
        j.probability == pytest.approx(0.8) and j.annotator == "openai:judge-model"
        for j in result.judgments
    )
    graded = judge_grades(judge, polite_items()[:1])
    grade = graded.grades[0]
    assert grade.grade == 7 and grade.expected == pytest.approx(7 * 0.6 + 8 * 0.3 + 6 * 0.1)
    assert graded.judgments[0].ratings == {0: 7.0, 1: 7.0}


def test_openai_judge_falls_back_when_the_server_refuses_logprobs(server):
    JudgeServer.offer_logprobs = False
    judge = OpenAIJudge(server, model="plain", workers=1)
    result = judge_pairwise(judge, polite_items(), seed=0)
    assert not judge.use_logprobs
    assert {j.item_id: j.ranking[0][0] for j in result.judgments} == {"x": 0, "y": 1}
    assert all(j.probability == 1.0 for j in result.judgments)
    assert [g.grade for g in judge_grades(judge, polite_items()[:1]).grades] == [7, 7]


def test_openai_judge_errors_are_one_line_input_errors(server):
    judge = OpenAIJudge(server.replace("/v1", "/v2"), model="m")
    with pytest.raises(InputError, match="judge request failed"):
        judge.choose(["(A) or (B)?"])
