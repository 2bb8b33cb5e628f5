"""What the benchmark coordinator and its workers share: data, the step gate, memory readings.

A worker is a separate process (alignkit's, or the peer's in the TRL venv). It sets
up, says ``ready``, and then runs one measured unit (a training step, a generation
call) each time the coordinator writes ``go`` on its stdin, so alignkit and its peer
never run at the same time and load on the machine hits both alike. Messages to the
coordinator are JSON lines on stdout prefixed with ``@@``; anything else a library
prints is passed through to the log.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HH_PATH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base.jsonl.gz"
MARK = "@@"

# The pieces of an HH transcript: "\n\nHuman: ..." and "\n\nAssistant: ..." turns.
_ROLES = {"Human": "user", "Assistant": "assistant"}


def emit(event: str, **fields) -> None:
    """One message to the coordinator."""
    sys.stdout.write(MARK + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    """High-water resident set size of this process (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    times = os.times()
    return times.user + times.system


class Gate:
    """Holds a worker between measured units; the coordinator releases one at a time.

    ``begin()`` blocks until ``go`` (the first call announces ``ready``); ``end(**info)``
    reports the unit's wall time. Any other command ends the process at once, after
    reporting the peak RSS (no model saving or clean-up is timed or waited for).
    """

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.ready_sent = False
        self.open = False
        self.command = ""
        self.started = 0.0
        self.cpu_started = 0.0

    def begin(self) -> str:
        if not self.ready_sent:
            emit("ready", setup_seconds=time.perf_counter() - self.created, rss_mb=peak_rss_mb())
            self.ready_sent = True
        line = sys.stdin.readline().strip()
        if not line.startswith("go"):
            self.finish()
        self.command = line[2:].strip()
        self.open = True
        self.started = time.perf_counter()
        self.cpu_started = _cpu_seconds()
        return self.command

    def end(self, **info) -> None:
        seconds = time.perf_counter() - self.started
        cpu = _cpu_seconds() - self.cpu_started
        self.open = False
        emit("unit", seconds=seconds, cpu_seconds=cpu, peak_rss_mb=peak_rss_mb(), **info)

    def finish(self) -> None:
        emit("final", peak_rss_mb=peak_rss_mb())
        os._exit(0)


def split_transcript(transcript: str) -> list[dict[str, str]]:
    """HH transcript -> chat messages."""
    messages: list[dict[str, str]] = []
    for piece in transcript.split("\n\n"):
        for speaker, role in _ROLES.items():
            if piece.startswith(f"{speaker}:"):
                messages.append({"role": role, "content": piece[len(speaker) + 1 :].strip()})
                break
        else:
            if messages:
                messages[-1]["content"] += "\n\n" + piece
    return messages


def hh_pairs(limit: int | None = None) -> list[dict]:
    """HH harmless-base rows as TRL-style conversational preference rows.

    ``prompt`` is every turn before the last assistant reply; ``chosen`` and ``rejected``
    are that reply. Rows whose replies are empty or equal are left out.
    """
    rows = []
    with gzip.open(HH_PATH, "rt") as handle:
        for line in handle:
            record = json.loads(line)
            chosen = split_transcript(record["chosen"])
            rejected = split_transcript(record["rejected"])
            if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
                continue
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                continue
            if not chosen[-1]["content"] or not rejected[-1]["content"]:
                continue
            if chosen[-1]["content"] == rejected[-1]["content"]:
                continue
            rows.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """Toy reward both frameworks call: prefers completions near 200 characters.

    alignkit calls ``f(prompts, completions)``; TRL calls it with keyword arguments
    and completions as lists of messages.
    """
    scores = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        scores.append(-abs(len(text) - 200) / 200.0)
    return scores
