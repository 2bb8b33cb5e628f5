"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def torchrun_command(args: list[str], processes: int = 2) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run ``alignkit ARGS`` under torchrun on loopback, one
    thread per process, this checkout first on the path."""
    import socket
    import sys

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "alignkit.cli",
        *args,
    ]
    return argv, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread here and in child processes: the same reduction order in both."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from alignkit.models import tiny_model_dir

    return str(tiny_model_dir())


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from alignkit.models import load_tokenizer

    return load_tokenizer(tiny_model)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def separable_prefs(tmp_path) -> Path:
    """Preference pairs a model can separate: the chosen reply always says 'yes', the rejected 'no'."""
    rows = []
    topics = ["cats", "rain", "music", "tea", "boats", "maps", "bread", "snow"]
    for i in range(32):
        topic = topics[i % len(topics)]
        rows.append(
            {
                "prompt": f"Question {i}: do you like {topic}?",
                "chosen": f"yes yes yes, {topic}",
                "rejected": f"no no no, {topic}",
            }
        )
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


@pytest.fixture
def sft_data(tmp_path) -> Path:
    rows = [
        {"prompt": f"Count to {n}.", "completion": " ".join(str(i) for i in range(1, n + 1))}
        for n in range(2, 18)
    ]
    return write_jsonl(tmp_path / "sft.jsonl", rows)
