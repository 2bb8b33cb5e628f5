"""Settings every training recipe shares, and the run directory they write to."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from alignkit.config import check, doc
from alignkit.errors import InputError
from alignkit.models import DEVICE_HELP, EMBEDDED_MODEL, LoraSettings, resolve_device


@dataclass
class TrainConfig:
    """Keys common to every training recipe (each recipe's Config adds its own)."""

    model: str = doc("HF directory, hub id, or the embedded smollm2-135m-instruct", EMBEDDED_MODEL)
    data: str = doc("training data: JSONL/JSON/Parquet file or a datasets id", "")
    eval_data: str = doc("held-out data; empty = hold out eval_fraction of data", "")
    eval_fraction: float = doc("share of data held out for evaluation when eval_data is empty", 0.0)
    output_dir: str = doc("run directory: model, checkpoints, metrics.csv, TensorBoard", "runs/out")
    max_steps: int = doc("optimizer steps to run", 100)
    batch_size: int = doc("examples (or pairs) per micro-batch", 8)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    max_length: int = doc("prompt + completion tokens per row", 512)
    max_prompt_length: int = doc("prompt tokens kept when a row is truncated; 0 = max_length/2", 0)
    overlong: Literal["truncate", "drop", "error"] = doc(
        "rows over max_length: truncate, drop (both counted and reported), or error", "truncate"
    )
    invalid_rows: Literal["error", "skip"] = doc(
        "a malformed row stops the run (error) or is counted and left out (skip)", "error"
    )
    lr: float = doc("peak learning rate (AdamW)", 1e-5)
    warmup_steps: int = doc("linear warm-up steps", 0)
    lr_schedule: Literal["linear", "cosine", "constant"] = doc("decay after warm-up", "linear")
    weight_decay: float = doc("AdamW weight decay", 0.0)
    max_grad_norm: float = doc("gradient norm clip; 0 turns clipping off", 1.0)
    save_steps: int = doc("checkpoint every N steps; 0 = only at the end", 0)
    keep_last: int = doc("checkpoints kept on disk", 2)
    eval_steps: int = doc("evaluate every N steps; 0 = only at the end", 0)
    log_steps: int = doc("write metrics every N steps", 1)
    seed: int = doc("seed for data order, initialisation and sampling", 0)
    bf16: Literal["auto", "true", "false"] = doc(
        "bf16 autocast: auto = where the CPU/GPU has it", "auto"
    )
    distributed: Literal["none", "ddp", "fsdp"] = doc(
        "data parallelism under torchrun: ddp, or fsdp (FSDP2 sharding); gloo on CPU, NCCL on GPU",
        "none",
    )
    device: str = doc(DEVICE_HELP, "auto")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings"})

    def validate(self) -> None:
        resolve_device(self.device)
        check(bool(self.data), "data", "is required (a JSONL/JSON/Parquet file or a dataset id)")
        check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        check(
            0 <= self.max_prompt_length < self.max_length,
            "max_prompt_length",
            f"must be in [0, max_length={self.max_length}), got {self.max_prompt_length}",
        )
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        check(self.save_steps >= 0, "save_steps", "must be >= 0")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(self.lora.r >= 0, "lora.r", "must be >= 0")

    def use_bf16(self) -> bool:
        from alignkit.models import bf16_supported

        return self.bf16 == "true" or (self.bf16 == "auto" and bf16_supported(self.torch_device()))

    def torch_device(self) -> torch.device:
        """The device ``device`` names (see :func:`alignkit.models.resolve_device`)."""
        return resolve_device(self.device)


def check_output_dir(output_dir: str, overwrite: bool, resume: bool) -> None:
    """Refuse, before any work, a run directory that exists without ``--overwrite``/``--resume``."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError("exists and is not a directory", path=output_dir, field="output_dir")
    occupied = path.is_dir() and any(path.iterdir())
    if occupied and not (resume or overwrite):
        raise InputError(
            "already exists; pass --overwrite to replace it or --resume to continue",
            path=output_dir,
            field="output_dir",
        )
    if resume and not occupied:
        raise InputError("nothing to resume: the directory is empty or missing", path=output_dir)


def prepare_output_dir(output_dir: str, overwrite: bool, resume: bool) -> Path:
    """Create the run directory; an old one goes only with ``--overwrite``.

    Callers validate all inputs first, so a bad row never costs the user an old run.
    """
    check_output_dir(output_dir, overwrite, resume)
    path = Path(output_dir)
    if resume:
        return path
    if path.is_dir() and overwrite:
        import shutil

        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(
            f"is not writable ({err.strerror})", path=output_dir, field="output_dir"
        ) from None
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads() -> None:
    """Use every core for intra-op parallelism unless the user said otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def start_run(seed: int) -> None:
    """Threads and seeds, before anything random (a fresh reward head, LoRA weights) exists."""
    set_threads()
    seed_everything(seed)
