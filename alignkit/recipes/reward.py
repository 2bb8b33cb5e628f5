"""Reward model: the policy's backbone with a linear head to one score, Bradley-Terry loss."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.config import check, doc
from alignkit.data import collate_pairs, load_preferences, tokenize_pairs
from alignkit.logprobs import last_token_states
from alignkit.losses.preference import bradley_terry_loss
from alignkit.models import load_reward_backbone, load_tokenizer
from alignkit.recipes.offline import fit, load_rows, start_job
from alignkit.training.common import TrainConfig, start_run


@dataclass
class Config(TrainConfig):
    output_dir: str = doc("run directory", "runs/reward")
    lr: float = doc("peak learning rate (AdamW)", 1e-5)
    eval_fraction: float = doc("share of data held out for evaluation", 0.1)
    use_margin: bool = doc("subtract the data's margin column inside the sigmoid (Llama 2)", True)
    center_coef: float = doc("reward-centering coefficient eta (0.01 recommended; 0 = off)", 0.0)

    def validate(self) -> None:
        super().validate()
        check(self.center_coef >= 0, "center_coef", "must be >= 0")


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder backbone, linear score head) of a decoder-only reward model, else None.

    Looks through a PEFT wrapper. transformers names the head of its decoder-only
    classifiers (``*ForSequenceClassification`` of Llama, Qwen, Mistral, ...) ``score``;
    encoder classifiers (BERT: ``classifier`` on a pooled state) are left to their forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = getattr(base, "score", None)
    if backbone is None or head is None or getattr(base.config, "is_encoder_decoder", False):
        return None
    return backbone, head


def reward_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (N, T) right-padded
    attention_mask: torch.Tensor,  # (N, T)
    completion_mask: torch.Tensor | None = None,  # (N, T)
) -> torch.Tensor:
    """One scalar per row, read at the last non-pad token. (N, T) -> (N,) fp32.

    Given the completion mask, the backbone runs each prompt once for the rows that
    share it (the chosen and rejected of a pair) and the head only at the last token;
    the scores are those of the plain forward (tests/test_fast_paths.py).
    """
    parts = _backbone_and_head(model) if completion_mask is not None else None
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    backbone, head = parts
    states = last_token_states(backbone, input_ids, attention_mask, completion_mask)  # (N, H)
    return head(states)[:, 0].float()


def make_reward_loss(use_margin: bool, center_coef: float):
    """The Bradley-Terry loss on a batch of pairs (chosen rows first, then rejected)."""

    def reward_loss(
        model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict]:
        scores = reward_scores(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )  # (2B,)
        chosen, rejected = scores.chunk(2)
        margin = batch["margin"] if use_margin else None
        loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center_coef)
        metrics["rewards/mean"] = scores.detach().mean()
        metrics["rewards/std"] = (
            scores.detach().std() if scores.numel() > 1 else scores.new_zeros(())
        )
        return loss, metrics

    return reward_loss


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    started = time.time()
    start_run(config.seed)
    # 0. validate every input before any compute or any file is touched
    tokenizer = load_tokenizer(config.model)
    rows, train_ids, eval_ids = load_rows(config, tokenizer, load_preferences, tokenize_pairs)
    # 1. model: backbone + fresh linear head to one score
    model = load_reward_backbone(config.model, config.lora, config.torch_device())
    job = start_job(config, model)  # distributed refusals, before any forward

    def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        return collate_pairs([rows[i] for i in indices], tokenizer.pad_token_id)

    lengths = [len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in rows]
    # 2. train, evaluate on the held-out pairs, save
    return fit(
        job=job,
        config=config,
        model=model,
        tokenizer=tokenizer,
        row_lengths=lengths,
        train_ids=train_ids,
        eval_ids=eval_ids,
        make_batch=make_batch,
        compute_loss=make_reward_loss(config.use_margin, config.center_coef),
        overwrite=overwrite,
        resume=resume,
        desc="reward",
        started=started,
    )
