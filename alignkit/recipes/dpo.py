"""DPO and its family (cDPO, rDPO, IPO, hinge, SimPO, ORPO, RPO, KTO) on preference data."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from alignkit.config import check, doc
from alignkit.data import (
    collate_pairs,
    collate_unpaired,
    load_preferences,
    load_unpaired,
    tokenize_pairs,
    tokenize_unpaired,
)
from alignkit.logprobs import token_logps
from alignkit.losses.preference import PAIRWISE_LOSS_SPECS, PAIRWISE_LOSSES, kto_loss
from alignkit.models import is_lora, load_policy, load_tokenizer, reference_mode
from alignkit.recipes.offline import console, fit, load_rows, start_job
from alignkit.reference import cached_reference_logps, score_sequences
from alignkit.training.common import TrainConfig, check_output_dir, start_run

LossName = Literal["dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo", "orpo", "rpo", "kto"]


@dataclass
class Config(TrainConfig):
    output_dir: str = doc("run directory", "runs/dpo")
    lr: float = doc("peak learning rate (AdamW)", 5e-6)
    loss: LossName = doc("dpo | cdpo | rdpo | ipo | hinge | simpo | orpo | rpo | kto", "dpo")
    beta: float = doc("KL strength beta (tau for IPO, lambda for ORPO)", 0.1)
    label_smoothing: float = doc("flip probability eps for cdpo / rdpo", 0.1)
    gamma_beta_ratio: float = doc("SimPO margin gamma / beta", 0.5)
    nll_coef: float = doc("RPO weight alpha on the chosen NLL", 1.0)
    desirable_weight: float = doc("KTO lambda_D", 1.0)
    undesirable_weight: float = doc("KTO lambda_U", 1.0)
    reference: str = doc("reference model; empty = the starting policy", "")

    def validate(self) -> None:
        super().validate()
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        if self.loss == "kto":
            check(self.batch_size > 1, "batch_size", "KTO needs batch_size > 1 (mismatched pairs)")


def _completion_sums(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(S(y), |y|) per row of the batch: (N,), (N,)."""
    mask = batch["completion_mask"]
    logps = token_logps(model, batch["input_ids"], batch["attention_mask"], mask).logps
    return logps.sum(-1), mask[:, 1:].sum(-1).float()


def make_pairwise_loss(name: str, hyper: dict[str, float]):
    """A loss over a batch of pairs (chosen rows first) with cached reference sums."""
    spec = PAIRWISE_LOSS_SPECS[name]
    loss_fn = PAIRWISE_LOSSES[name]
    kwargs = {k: hyper[k] for k in spec.hyperparameters}

    def pairwise_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        sums, counts = _completion_sums(model, batch)
        chosen_sum, rejected_sum = sums.chunk(2)
        chosen_count, rejected_count = counts.chunk(2)
        mean = spec.logp_reduction == "mean"
        args: dict[str, torch.Tensor] = {
            "chosen_logps": chosen_sum / chosen_count if mean else chosen_sum,
            "rejected_logps": rejected_sum / rejected_count if mean else rejected_sum,
        }
        if spec.needs_reference:
            ref_chosen, ref_rejected = batch["ref_logps"].unbind(-1)
            args["ref_chosen_logps"] = ref_chosen / chosen_count if mean else ref_chosen
            args["ref_rejected_logps"] = ref_rejected / rejected_count if mean else ref_rejected
        if spec.needs_chosen_nll:
            args["chosen_nll"] = -chosen_sum / chosen_count
        loss, metrics = loss_fn(**args, **kwargs)
        metrics["tokens"] = batch["attention_mask"].sum().float()
        return loss, metrics

    return pairwise_loss


def make_kto_loss(reference_scorer, hyper: dict[str, float]):
    """KTO over unpaired rows; the mismatched rows (x_i, y_{i+1}) are built in the batch."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        sums, _ = _completion_sums(model, batch)
        matched, mismatched = sums.chunk(2)
        with torch.no_grad():
            ref_sums = reference_scorer(batch)
        ref_matched, ref_mismatched = ref_sums.chunk(2)
        return kto_loss(
            matched,
            ref_matched,
            batch["label"],
            mismatched,
            ref_mismatched,
            beta=hyper["beta"],
            desirable_weight=hyper["desirable_weight"],
            undesirable_weight=hyper["undesirable_weight"],
        )

    return loss


def _reference_scorer(config: Config, model: torch.nn.Module):
    """A function (no grad) scoring a batch under the reference, and a way to free it."""
    if config.reference or not is_lora(model):
        reference = load_policy(config.reference or config.model, device=config.torch_device())
        reference.eval()
        return lambda batch: _completion_sums(reference, batch)[0]

    def under_base(batch):
        with reference_mode(model):
            return _completion_sums(model, batch)[0]

    return under_base


def run(config: Config, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    started = time.time()
    start_run(config.seed)
    # 0. validate every input before any compute or any file is touched
    tokenizer = load_tokenizer(config.model)
    unpaired = config.loss == "kto"
    rows, train_ids, eval_ids = load_rows(
        config,
        tokenizer,
        load_unpaired if unpaired else load_preferences,
        tokenize_unpaired if unpaired else tokenize_pairs,
    )
    model = load_policy(config.model, config.lora, config.torch_device())
    job = start_job(config, model)  # distributed refusals, before any forward
    hyper = {
        "beta": config.beta,
        "label_smoothing": config.label_smoothing,
        "gamma_beta_ratio": config.gamma_beta_ratio,
        "nll_coef": config.nll_coef,
        "desirable_weight": config.desirable_weight,
        "undesirable_weight": config.undesirable_weight,
    }
    check_output_dir(config.output_dir, overwrite, resume)
    pad = tokenizer.pad_token_id
    extra: dict[str, Any] = {"loss": config.loss}

    if config.loss == "kto":
        # KTO's reference point uses mismatched pairs that depend on the batch: score live.
        compute_loss = make_kto_loss(_reference_scorer(config, model), hyper)

        def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
            items = [rows[i] for i in indices]
            shifted = [items[(j + 1) % len(items)].completion_ids for j in range(len(items))]
            mismatched = [
                replace(item, completion_ids=ids) for item, ids in zip(items, shifted, strict=True)
            ]
            batch = collate_unpaired(items + mismatched, pad)
            batch["label"] = batch["label"][: len(items)]
            return batch

        lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rows]
    else:
        ref_logps = None
        if PAIRWISE_LOSS_SPECS[config.loss].needs_reference:
            # 1. reference log-probs: once, before training, cached on disk
            sequences = [
                (r.prompt_ids, ids) for r in rows for ids in (r.chosen_ids, r.rejected_ids)
            ]
            t0 = time.time()

            def compute() -> torch.Tensor:
                if config.reference or not is_lora(model):
                    reference = load_policy(
                        config.reference or config.model, device=config.torch_device()
                    )
                    return score_sequences(
                        reference, sequences, pad, 2 * config.batch_size, config.use_bf16()
                    )
                with reference_mode(model):
                    return score_sequences(
                        model, sequences, pad, 2 * config.batch_size, config.use_bf16()
                    )

            flat, from_cache = cached_reference_logps(
                config.reference or config.model,
                tokenizer,
                sequences,
                compute,
                config.use_bf16(),
                config.torch_device(),
            )
            ref_logps = flat.view(-1, 2)
            source = "cache" if from_cache else f"{time.time() - t0:.1f}s"
            console.print(f"reference log-probs for {len(rows)} pairs ({source})")
            extra["reference_from_cache"] = from_cache
        compute_loss = make_pairwise_loss(config.loss, hyper)

        def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
            batch = collate_pairs([rows[i] for i in indices], pad)
            if ref_logps is not None:
                batch["ref_logps"] = ref_logps[indices]
            return batch

        lengths = [len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in rows]

    # 2. train, evaluate on the held-out rows, save
    return fit(
        job=job,
        config=config,
        model=model,
        tokenizer=tokenizer,
        row_lengths=lengths,
        train_ids=train_ids,
        eval_ids=eval_ids,
        make_batch=make_batch,
        compute_loss=compute_loss,
        overwrite=overwrite,
        resume=resume,
        desc=config.loss,
        started=started,
        extra_summary=extra,
    )
