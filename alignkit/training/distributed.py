"""Data parallelism on PyTorch's own engine: ``torchrun`` + DDP (gloo on CPU, NCCL on GPU).

A run launched by ``torchrun --nproc-per-node N`` sees ``WORLD_SIZE=N``; with
``distributed=ddp`` each rank takes an equal slice of every global batch, the
model is wrapped in ``DistributedDataParallel`` (gradients averaged across ranks
during backward), metrics are averaged, and only rank 0 writes logs, checkpoints
and the final model. ``batch_size`` stays the *global* batch, so 2 processes
follow the same loss trajectory as 1 process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alignkit.errors import InputError


class LossModule(nn.Module):
    """Makes a recipe's loss the ``forward`` of one module, so DDP's hooks see the whole step."""

    def __init__(self, model: nn.Module, compute_loss: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.compute_loss = compute_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.compute_loss(self.model, batch)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous, equal slice of a global batch."""
        if not self.enabled:
            return indices
        size = len(indices) // self.world_size
        return indices[self.rank * size : (self.rank + 1) * size]

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self.enabled:
            return module
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce (for all but the last accumulated micro-batch)."""
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (same keys on every rank)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(packed)
        return {k: float(v) / self.world_size for k, v in zip(keys, packed, strict=True)}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(mode: str, batch_size: int) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if mode == "none":
        raise InputError(
            f"the run was launched on {world_size} processes; set distributed=ddp",
            path="config",
            field="distributed",
        )
    if batch_size % world_size:
        raise InputError(
            f"global batch {batch_size} does not split evenly over {world_size} processes",
            path="config",
            field="batch_size",
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


@contextlib.contextmanager
def main_first(job: Distributed) -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. creating the run directory); the others wait."""
    if not job.is_main:
        job.barrier()
    yield job.is_main
    if job.is_main:
        job.barrier()
