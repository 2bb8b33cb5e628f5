"""``alignkit serve``: the official openai client against a running server, LoRA adapters,
streaming, errors; and the labeling app's chat mode rating the served model."""

from __future__ import annotations

import os
import re
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from alignkit.feedback.exporting import export_rows
from alignkit.feedback.web.app import create_app as create_label_app
from alignkit.serve import PolicyServer, create_app, parse_adapters

from .conftest import login, running_server

HELLO = [{"role": "user", "content": "Say hello."}]


def _save_random_adapter(model_dir: str, out: Path, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    from alignkit.models import load_policy

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(load_policy(model_dir), config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def served(tiny_model: str, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("adapters")
    adapters = parse_adapters(
        [
            f"alpha={_save_random_adapter(tiny_model, folder / 'a', 1)}",
            f"beta={_save_random_adapter(tiny_model, folder / 'b', 2)}",
        ]
    )
    server = PolicyServer(tiny_model, adapters, name="base", max_new_tokens=12)
    with running_server(create_app(server)) as url:
        yield url


@pytest.fixture
def client(served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)


def _greedy(client: openai.OpenAI, model: str) -> str:
    response = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=8, temperature=0
    )
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 5
    assert response.choices[0].finish_reason in ("stop", "length")
    return response.choices[0].message.content


def test_models_and_greedy_completions_per_adapter(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]
    texts = {model: _greedy(client, model) for model in ("base", "alpha", "beta")}
    assert all(isinstance(t, str) and t for t in texts.values())
    assert _greedy(client, "base") == texts["base"]  # greedy is deterministic, and base is restored
    assert len(set(texts.values())) >= 2  # the adapters change the model


def test_streaming_matches_the_plain_completion(client: openai.OpenAI) -> None:
    plain = _greedy(client, "alpha")
    stream = client.chat.completions.create(
        model="alpha", messages=HELLO, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == plain.strip()


def test_several_samples_and_errors(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="beta", messages=HELLO, max_tokens=6, n=2, seed=3
    )
    assert [c.index for c in response.choices] == [0, 1]
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gamma", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="base", messages=HELLO, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[])


@pytest.mark.parametrize("kind", ["thumbs", "pairwise"])
def test_chat_mode_ratings_are_judgments_exported_per_user(people, served: str, kind: str) -> None:
    k = 1 if kind == "thumbs" else 2
    project = people.create_project("chat", kind, k, 1, "", 900, "chat", "alpha")
    app = create_label_app(people, serve_url=f"{served}/v1", chat_max_tokens=8)
    browser = TestClient(app)
    token = login(browser, "ann")
    sent = browser.post(
        f"/chat/{project.id}/send", data={"message": "Hello there", "csrf_token": token}
    )
    assert sent.status_code == 200 and 'id="label-form"' in sent.text
    item_id = re.search(r'name="item_id" value="([^"]+)"', sent.text).group(1)
    verdict = {"rating_0": "up"} if kind == "thumbs" else {"choice": "a"}
    rated = browser.post(
        f"/chat/{project.id}/rate",
        data={"item_id": item_id, "guideline_version": "1", "csrf_token": token, **verdict},
    )
    assert rated.status_code == 200 and 'name="message"' in rated.text  # back to the message box
    judgments = people.judgments(project.id)
    assert [(j.annotator, j.kind, j.item_id) for j in judgments] == [("ann", kind, item_id)]
    item = people.items(project.id)[0]
    assert (
        item.prompt == [{"role": "user", "content": "Hello there"}] and len(item.completions) == k
    )
    assert item.metadata["model"] == "alpha"
    rows = export_rows(
        people, project.id, "unpaired" if kind == "thumbs" else "pairs", annotator="ann"
    )
    assert len(rows) == 1 and export_rows(people, project.id, annotator="bob") == []
    if kind == "thumbs":
        assert rows[0]["label"] is True
    else:
        assert rows[0]["chosen"][0]["content"] in item.completions


def test_serve_refuses_device_cuda_without_cuda(tiny_model: str, capsys, monkeypatch) -> None:
    """One line naming --device, exit 2, before the model is loaded."""
    import torch

    from alignkit.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", tiny_model, "--device", device, "--port", "1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert err.strip() == (
            f"alignkit: command line: field '--device' is '{device}' but CUDA is not "
            "available on this machine (use cpu or auto)"
        ), err


def test_serve_on_device_cpu_answers_as_the_in_process_server(
    tiny_model: str, client: openai.OpenAI
) -> None:
    """``alignkit serve MODEL --device cpu`` as a process of its own: the base model's
    greedy reply is the in-process server's (which runs on the CPU by default)."""
    import subprocess
    import sys
    import time

    from .conftest import free_port

    port = free_port()
    argv = [sys.executable, "-m", "alignkit.cli", "serve", tiny_model, "--name", "base"]
    argv += ["--device", "cpu", "--port", str(port), "--max-new-tokens", "12"]
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()  # printed once the model is loaded
        assert banner.startswith("serving base on http://127.0.0.1:"), banner
        own = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        models = None
        for _ in range(100):  # uvicorn binds the port just after the banner
            try:
                models = [m.id for m in own.models.list().data]
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert models == ["base"]
        assert _greedy(own, "base") == _greedy(client, "base")
    finally:
        process.terminate()
        process.wait(timeout=30)
