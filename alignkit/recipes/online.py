"""Pieces every online recipe shares: config keys, prompts, prompt order, the reference policy.

An online recipe (PPO, RLOO / GRPO / REINFORCE, best-of-n, rejection sampling, online
DPO, distribution matching) samples from the policy it trains. The loop itself stays in
each recipe; this module only holds what they all need:

- :class:`OnlineConfig`: the keys they share (each recipe's ``Config`` adds its own);
- :func:`load_prompts`: training and evaluation prompts from a task or a prompts file;
- :class:`PromptSampler`: which prompts step ``s`` uses, from ``(seed, s)`` alone;
- :func:`encode_prompts`: prompt token ids, truncated from the left;
- :func:`rollout_seed`: the sampling seed of step ``s``, so a resumed run samples the same;
- :class:`ReferencePolicy`: log-probs under the frozen reference (a copy, or the LoRA base);
- :func:`evaluate_policy`: mean reward, gold score and KL on held-out prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from alignkit.config import check, doc
from alignkit.data.examples import Prompt
from alignkit.errors import InputError
from alignkit.models import (
    DEVICE_HELP,
    EMBEDDED_MODEL,
    LoraSettings,
    bf16_supported,
    hold_bf16,
    is_lora,
    load_policy,
    model_device,
    reference_mode,
    resolve_device,
)
from alignkit.rollout import Rollout, SamplingParams, generate, score

RewardFn = Callable[[list[Prompt], list[str]], torch.Tensor]
"""(prompts, completions), one prompt per completion -> scores (N,)."""


@dataclass
class OnlineConfig:
    """Keys common to every online recipe."""

    model: str = doc(
        "policy to train: HF directory, hub id, or smollm2-135m-instruct", EMBEDDED_MODEL
    )
    task: str = doc("built-in task: its prompts, and its gold judge for evaluation", "sentiment")
    data: str = doc("prompts file (JSONL with a 'prompt' field); replaces the task's", "")
    reward: str = doc(
        "reward: RM directory | module:function | task:NAME | comma-separated list",
        "task:sentiment",
    )
    reference: str = doc("reference policy for the KL; empty = the starting policy", "")
    output_dir: str = doc(
        "run directory: model, checkpoints, metrics.csv, TensorBoard", "runs/online"
    )
    max_steps: int = doc("rollout + update iterations", 100)
    prompts_per_step: int = doc("prompts sampled per step", 8)
    samples_per_prompt: int = doc("completions sampled per prompt", 1)
    max_new_tokens: int = doc("completion length limit (tokens)", 32)
    max_prompt_length: int = doc("prompt tokens kept (the first ones are dropped)", 128)
    temperature: float = doc("sampling temperature (also used in the training forward)", 0.7)
    top_p: float = doc("nucleus sampling mass; 1 turns it off", 1.0)
    top_k: int = doc("sample among the k most likely tokens; 0 turns it off", 0)
    lr: float = doc("peak learning rate (AdamW)", 3e-6)
    lr_schedule: Literal["linear", "cosine", "constant"] = doc("decay after warm-up", "linear")
    warmup_steps: int = doc("linear warm-up steps", 0)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    max_grad_norm: float = doc("gradient norm clip; 0 turns clipping off", 1.0)
    kl_coef: float = doc("KL coefficient beta towards the reference", 0.05)
    seed: int = doc("seed for initialisation, prompt order and sampling", 0)
    save_steps: int = doc("checkpoint every N steps; 0 = only the final model", 0)
    keep_last: int = doc("checkpoints kept on disk", 2)
    eval_every: int = doc("evaluate every N steps; 0 = only before and after training", 0)
    eval_prompts: int = doc("held-out prompts used for evaluation; 0 turns evaluation off", 32)
    bf16: Literal["auto", "true", "false"] = doc(
        "bf16 autocast: auto = where the CPU/GPU has it", "auto"
    )
    distributed: Literal["none", "ddp", "fsdp"] = doc(
        "under torchrun: ddp shards each step's prompts over ranks and sums gradients; "
        "fsdp also shards the trained weights (FSDP2) and samples from a full copy; "
        "gloo on CPU, NCCL on GPU; every row samples from its own seed",
        "none",
    )
    device: str = doc(DEVICE_HELP, "auto")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings"})

    def validate(self) -> None:
        resolve_device(self.device)
        check(bool(self.task or self.data), "data", "give a prompts file or a task")
        check(bool(self.reward.strip()), "reward", "is required")
        check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.prompts_per_step > 0, "prompts_per_step", "must be > 0")
        check(self.samples_per_prompt > 0, "samples_per_prompt", "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        check(self.max_prompt_length > 0, "max_prompt_length", "must be > 0")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(self.save_steps >= 0, "save_steps", "must be >= 0")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.eval_every >= 0, "eval_every", "must be >= 0")
        check(self.eval_prompts >= 0, "eval_prompts", "must be >= 0")
        check(self.lora.r >= 0, "lora.r", "must be >= 0")

    def use_bf16(self) -> bool:
        return self.bf16 == "true" or (self.bf16 == "auto" and bf16_supported(self.torch_device()))

    def torch_device(self) -> torch.device:
        """The device ``device`` names (see :func:`alignkit.models.resolve_device`)."""
        return resolve_device(self.device)

    def sampling(self, step: int) -> SamplingParams:
        """Sampling settings of step ``step`` (its seed from :func:`rollout_seed`)."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=rollout_seed(self.seed, step),
        )


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of ``step``: a function of (seed, step) only, so resume is exact."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


def _prompts_from_file(path: str) -> list[Prompt]:
    from alignkit.data.formats import read_rows
    from alignkit.data.validation import prompt_value, require

    return [prompt_value(row, "prompt", require(row, "prompt")) for row in read_rows(path)]


def load_prompts(task: str, data: str) -> tuple[list[Prompt], list[Prompt]]:
    """(train prompts, eval prompts).

    Training prompts come from ``data`` (a file whose rows have a ``prompt``: a string or
    chat messages) when given, else from the task. Evaluation prompts are the task's
    held-out prompts (none without a task). Raises :class:`InputError` on bad input.
    """
    train: list[Prompt] = _prompts_from_file(data) if data else []
    held_out: list[Prompt] = []
    if task:
        from alignkit.tasks import get_task

        found = get_task(task)
        if not data:
            train = found.prompts("train")
        held_out = found.prompts("eval")
    if not train:
        raise InputError("no training prompts", path=data or f"task:{task}")
    return train, held_out


def task_gold(task: str, device: torch.device | str = "cpu") -> RewardFn | None:
    """The task's gold judge (prompts, completions) -> (N,), or None; a judge that runs
    a model of its own (the harmless task's encoder) runs it on ``device``."""
    if not task:
        return None
    from alignkit.tasks import get_task

    return get_task(task).gold_on(device)


class PromptSampler:
    """Prompt indices of each step: a stream of seeded permutations, one per epoch.

    Step ``s`` (1-based) takes positions ``[(s-1) b, s b)`` of the stream, so a batch
    depends only on (number of prompts, batch size, seed, step): resuming needs no state.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int) -> None:
        if num_prompts < 1 or batch_size < 1:
            raise ValueError("PromptSampler needs at least one prompt and batch_size >= 1")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._permutation = -1, []  # the last epoch's order, reused

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._permutation = epoch, rng.permutation(self.num_prompts).tolist()
        return self._permutation

    def indices(self, step: int) -> list[int]:
        """Prompt indices of step ``step`` (>= 1)."""
        start = (step - 1) * self.batch_size
        picked = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.num_prompts)
            picked.append(self._order(epoch)[offset])
        return picked


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], max_prompt_length: int
) -> list[list[int]]:
    """Token ids of each prompt (chat prompts through the template, with the generation
    prompt), keeping the last ``max_prompt_length`` tokens so the assistant header survives."""
    from alignkit.data.tokenize import encode_prompt

    return [encode_prompt(tokenizer, prompt)[-max_prompt_length:] for prompt in prompts]


# ---------------------------------------------------------------------------------------
# Reference policy
# ---------------------------------------------------------------------------------------


class ReferencePolicy:
    """The frozen policy the KL is measured against.

    With a LoRA policy and no separate ``reference`` it is the policy itself with its
    adapter disabled (no second copy in memory); otherwise a frozen model loaded from
    ``reference`` or, when that is empty, from ``model_name`` (the starting policy).
    Build it before a checkpoint is loaded into the policy.

    ``bf16_weights``: the policy computes from bf16 copies of its weights
    (:meth:`alignkit.recipes.online_run.OnlineRun.bf16_scope`), so a separate reference
    holds its parameters in bf16 from the start (the same values as those copies, half
    the memory, no cast per call); its buffers (the rotary frequencies) stay fp32.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        model_name: str,
        reference: str = "",
        bf16_weights: bool = False,
    ) -> None:
        self.policy = policy
        self.model: torch.nn.Module | None = None
        if reference or not is_lora(policy):
            self.model = load_policy(reference or model_name, device=model_device(policy))
            self.model.eval()
            self.model.requires_grad_(False)
            if bf16_weights:
                hold_bf16(self.model)

    def _context(self) -> contextlib.AbstractContextManager:
        return reference_mode(self.policy) if self.model is None else contextlib.nullcontext()

    @torch.no_grad()
    def logps(self, rollout: Rollout, bf16: bool, temperature: float | None = None) -> torch.Tensor:
        """log pi_ref of each completion token at the rollout's temperature.  # (N, P+T)"""
        model = self.model if self.model is not None else self.policy
        was_training = model.training
        model.eval()
        try:
            with self._context():
                return score(model, rollout, temperature, bf16=bf16).logps
        finally:
            model.train(was_training)


def call_reward(
    fn: RewardFn,
    prompts: list[Prompt],
    completions: list[str],
    what: str,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``fn(prompts, completions)`` as an fp32 (N,) tensor on ``device`` (the rollout's);
    a wrong shape is an input error. ``fn`` gets Python strings and may compute anywhere
    (a task's judge on the CPU, a reward model on its own device)."""
    scores = torch.as_tensor(fn(prompts, completions), dtype=torch.float32).reshape(-1).cpu()
    if scores.shape[0] != len(completions):
        raise InputError(
            f"returned {scores.shape[0]} scores for {len(completions)} completions", path=what
        )
    return scores.to(device)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_policy(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    bf16: bool,
    reward_fn: RewardFn | None = None,
    gold_fn: RewardFn | None = None,
    reference: ReferencePolicy | None = None,
) -> dict[str, float]:
    """One completion per held-out prompt; mean ``eval/reward``, ``eval/gold``, ``eval/kl``
    (sequence-summed log pi - log pi_ref) and ``eval/length``. The same ``params.seed`` gives
    the same samples from the same policy."""
    if not prompts:
        return {}
    rollout = generate(policy, tokenizer, prompt_ids, params, num_samples=1, bf16=bf16)
    completions, prompt_list = rollout.completions, list(prompts)
    metrics = {"eval/length": float(rollout.completion_lengths.float().mean())}
    if reward_fn is not None:
        metrics["eval/reward"] = float(
            call_reward(reward_fn, prompt_list, completions, "reward").mean()
        )
    if gold_fn is not None:
        metrics["eval/gold"] = float(call_reward(gold_fn, prompt_list, completions, "gold").mean())
    if reference is not None:
        was_training = policy.training
        policy.eval()
        logps = score(policy, rollout, bf16=bf16).logps
        policy.train(was_training)
        ref_logps = reference.logps(rollout, bf16)
        mask = rollout.completion_mask.float()
        metrics["eval/kl"] = float(((logps - ref_logps) * mask).sum(1).mean())
    return metrics
