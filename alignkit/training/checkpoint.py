"""Atomic, resumable checkpoints.

A checkpoint is a directory ``output_dir/checkpoints/step-000120`` holding the
trainable weights (safetensors), optimizer and scheduler state, every RNG state,
the step, and whatever recipe state the caller adds (KL controller, data
position...). It is written to a hidden temporary directory and renamed into
place, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.errors import InputError

CHECKPOINTS = "checkpoints"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (tied weights appear once)."""
    return {
        name: param.detach().contiguous().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically and prune to the newest ``keep_last``.

    ``weights`` and ``optimizer_state`` replace what is read from ``model`` and
    ``optimizer`` (FSDP2 gathers them from the shards first)."""
    from alignkit.training.distributed import to_device

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    # CPU copies of GPU tensors (CPU tensors as they are), so a CPU-only machine loads it
    save_file(
        to_device(weights if weights is not None else trainable_state(model), "cpu"),
        str(staging / "model.safetensors"),
    )
    torch.save(
        {
            "optimizer": to_device(
                optimizer_state if optimizer_state is not None else optimizer.state_dict(), "cpu"
            ),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "extra": to_device(extra or {}, "cpu"),
        },
        staging / "state.pt",
    )
    (staging / "meta.json").write_text(json.dumps({"step": step}))
    if final.exists():
        _discard(final)
    staging.rename(final)
    keep = {p.name for p in list_checkpoints(output_dir)[-keep_last:]}
    for leftover in root.iterdir():
        # Older checkpoints, and whatever a kill left half-written or half-deleted.
        if leftover.name not in keep:
            _discard(leftover)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory; the rename first makes it vanish from view atomically."""
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    try:
        path.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temporary ones are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(step, weights, state) of a checkpoint; a damaged one is an :class:`InputError`."""
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        step = json.loads((path / "meta.json").read_text())["step"]
    except Exception as err:  # any corruption is the user's file, not our bug
        raise InputError(
            f"checkpoint is unreadable ({type(err).__name__})", path=str(path)
        ) from None
    return step, weights, state


def optimizer_state_by_name(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (the form FSDP2 saves and loads); a
    plain ``optimizer.state_dict()`` numbers the parameters in ``param_groups`` order."""
    if all(isinstance(key, str) for key in state["state"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    # the kernel choice (fused/foreach) stays the loading optimizer's own
    groups = [
        {
            **{k: v for k, v in group.items() if k not in ("fused", "foreach")},
            "params": [order[i] for i in group["params"]],
        }
        for group in state["param_groups"]
    ]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_index(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_name`: the form ``load_state_dict`` takes."""
    if all(isinstance(key, int) for key in state["state"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [
        {**group, "params": [index[name] for name in group["params"]]}
        for group in state["param_groups"]
    ]
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    load_state: Any = None,
) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimizer, scheduler and RNG; returns (step, extra state).

    ``load_state(weights, optimizer_state)``, when given, restores the weights and the
    optimizer instead (FSDP2 shards them)."""
    step, weights, state = read_checkpoint(path)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in names if name not in weights]
    if missing:
        raise InputError(
            f"checkpoint does not match the model (missing {missing[0]})", path=str(path)
        )
    if load_state is not None:
        load_state(weights, optimizer_state_by_name(state["optimizer"], model, optimizer))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return step, state["extra"]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(optimizer_state_by_index(state["optimizer"], model, optimizer))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return step, state["extra"]
