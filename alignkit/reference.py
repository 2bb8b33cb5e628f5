"""Reference-model log-probs, computed once before training and cached on disk.

The cache key covers the model (config and weight files), the tokenizer (vocabulary
and chat template), the exact token ids scored, the compute dtype and the device type,
so a changed model, tokenizer, dataset or device can never be served a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.logprobs import sequence_logps
from alignkit.models import autocast, bf16_compute, cache_root, model_device, resolve_model


def model_fingerprint(name: str) -> str:
    """Config plus name/size/mtime of each weight file (cheap, and changes with the weights)."""
    path = Path(resolve_model(name))
    if not path.is_dir():
        return f"hub:{name}"
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.suffix in (".json", ".safetensors", ".bin") and file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if file.name == "config.json":
                digest.update(file.read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return digest.hexdigest()


def sequences_fingerprint(sequences: list[tuple[list[int], list[int]]]) -> str:
    digest = hashlib.sha256()
    for prompt_ids, completion_ids in sequences:
        digest.update(json.dumps([prompt_ids, completion_ids]).encode())
    return digest.hexdigest()


def score_sequences(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    bf16: bool,
) -> torch.Tensor:
    """Summed completion log-probs S(y) for each (prompt_ids, completion_ids). -> (N,) fp32.

    Sequences sharing a prompt are put in the same batch, longest prompts' groups
    together, so :func:`~alignkit.logprobs.token_logps` runs each prompt once.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt_ids, _) in enumerate(sequences):
        groups.setdefault(tuple(prompt_ids), []).append(i)
    by_length = sorted(
        groups.values(), key=lambda g: max(len(sequences[i][0]) + len(sequences[i][1]) for i in g)
    )
    order = [i for group in by_length for i in group]
    out = torch.zeros(len(sequences), dtype=torch.float32)
    was_training = model.training
    model.eval()
    with bf16_compute(model, enabled=bf16), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(sequences[i][0]) + len(sequences[i][1]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            completion_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(chunk):
                prompt_ids, completion_ids = sequences[i]
                ids = prompt_ids + completion_ids
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                completion_mask[row, len(prompt_ids) : len(ids)] = 1
            device = model_device(model)
            input_ids, attention_mask, completion_mask = (
                t.to(device) for t in (input_ids, attention_mask, completion_mask)
            )
            with autocast(device, enabled=bf16):
                sums, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
            out[chunk] = sums.float().cpu()
    model.train(was_training)
    return out


def reference_cache_key(
    model_name: str,
    tokenizer,
    sequences: list[tuple[list[int], list[int]]],
    bf16: bool,
    device: torch.device | str,
) -> str:
    """The cache entry's name: model, tokenizer, sequences, compute dtype and the type of
    device that scores them (bf16 kernels round differently on a GPU and on a CPU)."""
    return hashlib.sha256(
        "|".join(
            [
                model_fingerprint(model_name),
                tokenizer_fingerprint(tokenizer),
                sequences_fingerprint(sequences),
                f"bf16={bf16}",
                "compute=bf16-weights" if bf16 else "compute=fp32",
                f"device={torch.device(device).type}",
            ]
        ).encode()
    ).hexdigest()[:32]


def cached_reference_logps(
    model_name: str,
    tokenizer,
    sequences: list[tuple[list[int], list[int]]],
    compute: Callable[[], torch.Tensor],
    bf16: bool,
    device: torch.device | str,
) -> tuple[torch.Tensor, bool]:
    """(S_ref for every sequence, whether it came from the cache); ``compute`` scores
    them on ``device`` when the cache has no entry."""
    key = reference_cache_key(model_name, tokenizer, sequences, bf16, device)
    path = cache_root() / "reference_logps" / f"{key}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu")
        if cached.shape == (len(sequences),):
            return cached, True
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=path.parent)
    os.close(handle)
    torch.save(values, tmp)
    os.replace(tmp, path)  # atomic: concurrent writers (e.g. DDP ranks) never see half a file
    return values, False
