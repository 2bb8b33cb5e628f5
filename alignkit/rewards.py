"""One interface over reward sources: ``reward(prompts, completions) -> (N,) fp32 tensor``.

A prompt is a string or a list of chat messages; a completion is the sampled
text. Sources, as written in ``reward=...``:

- ``DIR``: a reward model, any ``AutoModelForSequenceClassification`` directory
  with one output. Reads prompt + completion rendered exactly as
  :func:`alignkit.data.tokenize.encode_completion` renders training pairs (chat
  template for chat prompts, EOS appended), scored at the last non-pad token.
- ``classifier:DIR:LABEL`` (probability of class LABEL) or
  ``classifier:DIR:LABEL:logit``: a text classifier with several classes, e.g. a
  sentiment model. LABEL is a name from the model's ``id2label`` or an index. It
  reads prompt + completion for string prompts and the completion alone for chat.
- ``module:function``: a Python function ``(prompts, completions) -> N numbers``.
- ``task:NAME``: a built-in task's gold judge (``task:sentiment``), for
  experiments that measure how far a policy gets with the true objective.
- a list of these: an ensemble, combined by ``mean``, ``min`` or
  ``mean_minus_std`` (mean - k * std across members, a pessimistic estimate that
  penalises completions the members disagree on; Coste et al. 2310.02743).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from alignkit.errors import InputError
from alignkit.models import autocast, load_tokenizer
from alignkit.tasks import Prompt, get_task, import_function, prompt_text

ENSEMBLE_MODES = ("mean", "min", "mean_minus_std")


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        """(N,) fp32 rewards, one per completion."""
        ...


def _bad_spec(message: str, source: str) -> InputError:
    return InputError(message, path=source, field="reward")


def _check_lengths(prompts: Sequence[Prompt], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")


def _as_rewards(values: object, count: int, name: str) -> torch.Tensor:
    """Any sequence of numbers -> (N,) fp32, checked for length and finiteness."""
    try:
        rewards = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name} did not return numbers", field="reward") from None
    if rewards.numel() != count:
        raise InputError(
            f"{name} returned {rewards.numel()} values for {count} completions", field="reward"
        )
    if not torch.isfinite(rewards).all():
        raise InputError(f"{name} returned a NaN or infinite reward", field="reward")
    return rewards


def _load_classifier(
    path: Path,
    source: str,
    tokenizer: PreTrainedTokenizerBase | None,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Model in eval mode on ``device`` and its tokenizer (``tokenizer`` when the
    directory has none)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _bad_spec(f"cannot read {path} ({str(err).splitlines()[0]})", source) from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise _bad_spec(
            f"{path} is not a sequence classifier (architectures: {', '.join(architectures)})",
            source,
        )
    if (path / "tokenizer_config.json").is_file() or tokenizer is None:
        try:
            tokenizer = load_tokenizer(str(path))
        except (OSError, ValueError) as err:
            message = str(err).splitlines()[0]
            raise _bad_spec(f"cannot load a tokenizer from {path} ({message})", source) from None
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _right_padded(ids_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in ids_lists)
    input_ids = torch.full((len(ids_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids_lists), width), dtype=torch.long)
    for row, ids in enumerate(ids_lists):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _classify(
    model: torch.nn.Module,
    ids_lists: list[list[int]],
    pad_id: int,
    batch_size: int,
    bf16: bool | None,
) -> torch.Tensor:
    """Logits (N, num_labels) fp32, batched by length (right padding, bf16 autocast)."""
    order = sorted(range(len(ids_lists)), key=lambda i: len(ids_lists[i]))
    logits = torch.zeros(len(ids_lists), model.config.num_labels)
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, enabled=bf16):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = _right_padded([ids_lists[i] for i in rows], pad_id)
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            logits[rows] = out.logits.float().cpu()
    return logits


class RewardModel:
    """A one-output sequence classifier scoring prompt + completion at its last token."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
        bf16: bool | None = None,
        source: str = "config",
        device: torch.device | str = "cpu",
    ) -> None:
        self.model, self.tokenizer = _load_classifier(Path(path), source, tokenizer, device)
        if self.model.config.num_labels != 1:
            raise _bad_spec(
                f"{path} has {self.model.config.num_labels} outputs; a reward model has 1 "
                "(use classifier:DIR:LABEL for a classifier)",
                source,
            )
        self.batch_size, self.max_length, self.bf16 = batch_size, max_length, bf16

    def token_ids(self, prompt: Prompt, completion: str) -> list[int]:
        """Prompt + completion ids as the reward recipe tokenizes a training pair."""
        from alignkit.data.tokenize import encode_completion

        answer = completion if isinstance(prompt, str) else [
            {"role": "assistant", "content": completion}
        ]  # fmt: skip
        prompt_ids, completion_ids = encode_completion(self.tokenizer, prompt, answer)
        ids = prompt_ids + completion_ids
        return ids[-self.max_length :]  # keep the end: the score is read at the EOS

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        _check_lengths(prompts, completions)
        if not completions:
            return torch.zeros(0)
        ids = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        return _classify(self.model, ids, self.tokenizer.pad_token_id, self.batch_size, self.bf16)[
            :, 0
        ]


class ClassifierReward:
    """Probability (or logit) of one class of a text classifier."""

    def __init__(
        self,
        path: str | Path,
        label: str,
        use_logit: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        bf16: bool | None = None,
        source: str = "config",
        device: torch.device | str = "cpu",
    ) -> None:
        self.model, self.tokenizer = _load_classifier(Path(path), source, tokenizer, device)
        id2label = {int(i): str(name) for i, name in self.model.config.id2label.items()}
        by_name = {name.lower(): i for i, name in id2label.items()}
        if label.lower() in by_name:
            self.label_index = by_name[label.lower()]
        elif label.isdigit() and int(label) < self.model.config.num_labels:
            self.label_index = int(label)
        else:
            known = ", ".join(id2label[i] for i in sorted(id2label))
            raise _bad_spec(f"{path} has no class {label!r} (classes: {known})", source)
        self.use_logit, self.batch_size, self.max_length = use_logit, batch_size, max_length
        self.bf16 = bf16

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        _check_lengths(prompts, completions)
        if not completions:
            return torch.zeros(0)
        texts = [
            prompt_text(p) + c if isinstance(p, str) else c
            for p, c in zip(prompts, completions, strict=True)
        ]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        ids = [list(row) for row in encoded["input_ids"]]
        logits = _classify(self.model, ids, self.tokenizer.pad_token_id, self.batch_size, self.bf16)
        if self.use_logit:
            return logits[:, self.label_index]
        return torch.softmax(logits, dim=-1)[:, self.label_index]


class FunctionReward:
    """A Python function ``(prompts, completions) -> N numbers`` (list, array or tensor)."""

    def __init__(self, function: Callable[..., object], name: str) -> None:
        self.function, self.name = function, name

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        _check_lengths(prompts, completions)
        return _as_rewards(
            self.function(list(prompts), list(completions)), len(completions), self.name
        )


class Ensemble:
    """Several reward sources combined per completion: mean, min, or mean - k * std."""

    def __init__(self, members: Sequence[RewardFn], mode: str = "mean", std_coef: float = 1.0):
        if mode not in ENSEMBLE_MODES:
            raise InputError(
                f"must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}", field="ensemble"
            )
        self.members, self.mode, self.std_coef = list(members), mode, std_coef

    def member_rewards(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        """(M, N) fp32: each member's rewards, for diagnostics (members' disagreement)."""
        return torch.stack([member(prompts, completions) for member in self.members])

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        return combine(self.member_rewards(prompts, completions), self.mode, self.std_coef)


def combine(member_rewards: torch.Tensor, mode: str, std_coef: float = 1.0) -> torch.Tensor:
    """(M, N) -> (N,): mean, min, or mean - std_coef * std (population std, over M members)."""
    if mode == "mean":
        return member_rewards.mean(0)
    if mode == "min":
        return member_rewards.min(0).values
    if mode == "mean_minus_std":
        return member_rewards.mean(0) - std_coef * member_rewards.std(0, correction=0)
    raise ValueError(f"unknown ensemble mode {mode!r}")


def _build_one(
    spec: str, source: str, tokenizer: PreTrainedTokenizerBase | None, **kwargs: object
) -> RewardFn:
    spec = spec.strip()
    if not spec:
        raise _bad_spec("is empty", source)
    if spec.startswith("task:"):
        name = spec[len("task:") :]
        try:
            task = get_task(name)
        except InputError as err:
            raise _bad_spec(err.message, source) from None
        # a judge running a model of its own (the harmless encoder) uses the reward's device
        gold = task.gold_on(kwargs.get("device", "cpu"))
        return FunctionReward(gold, spec)
    if spec.startswith("classifier:"):
        parts = spec[len("classifier:") :].split(":")
        use_logit = len(parts) >= 3 and parts[-1] in ("logit", "prob")
        mode = parts.pop() if use_logit else "prob"
        if len(parts) < 2 or not parts[-1] or not parts[0]:
            raise _bad_spec(f"expected classifier:DIR:LABEL[:logit], got {spec!r}", source)
        label, path = parts[-1], ":".join(parts[:-1])
        if not Path(path).is_dir():
            raise _bad_spec(f"classifier directory not found: {path}", source)
        return ClassifierReward(
            path, label, mode == "logit", tokenizer=tokenizer, source=source, **kwargs
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _bad_spec(
                f"{spec} is not a Hugging Face model directory (no config.json)", source
            )
        return RewardModel(path, tokenizer=tokenizer, source=source, **kwargs)
    if "/" in spec or spec.startswith((".", "~")):
        raise _bad_spec(f"reward model directory not found: {spec}", source)
    if ":" in spec:
        try:
            function = import_function(spec, field="reward", source=source)
        except InputError as err:
            raise _bad_spec(err.message, source) from None
        return FunctionReward(function, spec)
    raise _bad_spec(
        f"{spec!r} is not a directory, module:function, task:NAME or classifier:DIR:LABEL", source
    )


def build_reward(
    spec: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    ensemble: str = "mean",
    std_coef: float = 1.0,
    source: str = "config",
    **kwargs: object,
) -> RewardFn:
    """A reward function from ``reward=...`` (one spec, or a list for an ensemble).

    ``tokenizer`` (the policy's) serves a model directory saved without a tokenizer;
    a directory with its own tokenizer always uses that one. ``kwargs``
    (``batch_size``, ``max_length``, ``bf16``, ``device``) go to model-backed sources,
    which compute on ``device`` and return CPU tensors like every other source.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise _bad_spec("needs at least one reward source", source)
    members = [_build_one(s, source, tokenizer, **kwargs) for s in specs]
    if len(members) == 1:
        return members[0]
    return Ensemble(members, ensemble, std_coef)
