"""Supervised fine-tuning (instruction tuning) with the loss on completion tokens only."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.config import doc
from alignkit.data import collate_sft, load_sft, tokenize_sft
from alignkit.logprobs import token_logps
from alignkit.models import load_policy, load_tokenizer
from alignkit.recipes.offline import fit, load_rows, start_job
from alignkit.training.common import TrainConfig, start_run


@dataclass
class Config(TrainConfig):
    output_dir: str = doc("run directory", "runs/sft")
    lr: float = doc("peak learning rate (AdamW)", 2e-5)
    data_format: str = doc("auto, or one of: messages, prompt_completion, alpaca", "auto")


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean negative log-likelihood over the completion tokens of the batch.

    ``L = -sum_t m_t log pi(y_t | x, y_<t) / sum_t m_t`` with ``m`` the completion mask (B, T).
    """
    mask = batch["completion_mask"]
    result = token_logps(model, batch["input_ids"], batch["attention_mask"], mask)
    tokens = mask[:, 1:].sum().clamp(min=1)
    nll = -result.logps.sum() / tokens
    return nll, {"tokens": float(tokens), "ppl": float(torch.exp(nll.detach()))}


sft_loss.token_mean = True  # under torchrun each rank's loss is weighted by its tokens


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    started = time.time()
    start_run(config.seed)
    # 0. every input is validated before any compute or any file is touched
    tokenizer = load_tokenizer(config.model)
    fmt = None if config.data_format == "auto" else config.data_format
    rows, train_ids, eval_ids = load_rows(config, tokenizer, load_sft, tokenize_sft, format=fmt)
    model = load_policy(config.model, config.lora, config.torch_device())
    job = start_job(config, model)  # distributed refusals, before any forward

    def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        return collate_sft([rows[i] for i in indices], tokenizer.pad_token_id)

    return fit(
        job=job,
        config=config,
        model=model,
        tokenizer=tokenizer,
        row_lengths=[len(r.prompt_ids) + len(r.completion_ids) for r in rows],
        train_ids=train_ids,
        eval_ids=eval_ids,
        make_batch=make_batch,
        compute_loss=sft_loss,
        overwrite=overwrite,
        resume=resume,
        desc="sft",
        started=started,
    )
