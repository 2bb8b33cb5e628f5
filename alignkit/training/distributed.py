"""Data parallelism on PyTorch's own engine: ``torchrun`` + DDP or FSDP2 (gloo on CPU,
NCCL on GPU).

A run launched by ``torchrun --nproc-per-node N`` sees ``WORLD_SIZE=N``; with
``distributed=ddp`` each rank takes an equal slice of every global batch, the
model is wrapped in ``DistributedDataParallel`` (gradients averaged across ranks
during backward), metrics are averaged, and only rank 0 writes logs, checkpoints
and the final model. ``batch_size`` stays the *global* batch, so 2 processes
follow the same loss trajectory as 1 process.

``distributed=fsdp`` shards instead (``torch.distributed.fsdp.fully_shard``, FSDP2):
each decoder layer is one parameter group and the loss module the root, so
parameters, gradients and optimizer state are split over the ranks and gathered
layer by layer. Checkpoints and the final model are gathered into full tensors
(``torch.distributed.checkpoint.state_dict``) and written by rank 0 in the same
format as a single-process run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
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
    mode: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")  # this rank's models, batches, collectives

    @property
    def sharded(self) -> bool:
        return self.enabled and self.mode == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def refuse_lora(self, lora: bool) -> None:
        """Stop a LoRA run that would be sharded: FSDP2 here trains full weights only."""
        if lora and self.sharded:
            raise InputError(
                "LoRA is not supported with distributed=fsdp; use distributed=ddp",
                path="config",
                field="distributed",
            )

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous, equal slice of a global batch."""
        start, stop = self.part(len(indices))
        return indices[start:stop]

    def part(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous, equal slice of ``count`` items."""
        if not self.enabled:
            return 0, count
        size = count // self.world_size
        return self.rank * size, (self.rank + 1) * size

    def local_rows(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous, equal chunk of a global minibatch's row indices."""
        if not self.enabled:
            return index
        return index.tensor_split(self.world_size)[self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (tensors, lists, dicts, dataclasses of them), in rank order.

        Tensors travel through the CPU and arrive on this rank's device (a pickled CUDA
        tensor would otherwise land on the sender's GPU)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, to_device(obj, torch.device("cpu")))
        return [to_device(part, self.device) for part in out]

    def weighted_sum(
        self, values: dict[str, float], weights: dict[str, float] | float
    ) -> dict[str, float]:
        """sum over ranks of weight x value, per key (same keys on every rank).

        A statistic that is a mean over a global minibatch is the sum of each rank's mean
        over its own rows weighted by its share of them (of tokens, or of rows).
        """
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        share = [weights if isinstance(weights, float) else weights[k] for k in keys]
        scaled = [values[k] * w for k, w in zip(keys, share, strict=True)]
        packed = torch.tensor(scaled, dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)
        summed = {k: float(v) for k, v in zip(keys, packed, strict=True)}
        return {k: summed[k] for k in values}

    def token_share(self, tokens: float) -> float:
        """world size x this rank's share of the tokens summed over ranks: the factor that
        turns the ranks' average of per-rank token means into the global token mean."""
        if not self.enabled:
            return 1.0
        packed = torch.tensor([tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)
        return tokens * self.world_size / max(float(packed), 1.0)

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        packed = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        return float(packed)

    def sum_gradients(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks (one flat all-reduce); a parameter
        without a gradient on this rank contributes zeros. Each rank's loss must already
        carry its share of the global mean. Under FSDP2 the backward pass has already
        reduced them into the shards (:meth:`backward`): nothing to do."""
        if not self.enabled or self.sharded or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            size = grad.numel()
            param.grad = flat[offset : offset + size].view_as(grad).to(grad.dtype)
            offset += size

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` for a rank's loss that carries its share of the global mean,
        so the gradient is the sum over ranks. FSDP2's reduce-scatter averages the ranks'
        gradients instead, so under ``fsdp`` the loss is scaled by the world size first
        (gloo has no pre-multiplied sum to set the divide factor to 1)."""
        (loss * self.world_size if self.sharded else loss).backward()

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self.enabled:
            return module
        if self.sharded:
            return _fully_shard(module, self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce (for all but the last accumulated micro-batch)."""
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        if self.sharded:
            return _fsdp_no_sync(module)
        return contextlib.nullcontext()

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters as full CPU tensors (a collective: call on every
        rank; rank 0 gets the tensors, the others an empty dict)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v.contiguous() for k, v in state.items() if k in names}

    def full_optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer state gathered into full tensors, keyed by parameter name
        (a collective; rank 0 gets it)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load_full_state(
        self,
        model: nn.Module,
        optimizer: Any,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
    ) -> None:
        """Shard full weights and optimizer state (as :meth:`full_weights` and
        :meth:`full_optimizer_state` return them) into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

    @torch.no_grad()
    def copy_full_weights(self, sharded: nn.Module, plain: nn.Module) -> None:
        """Copy the parameters of ``sharded`` (FSDP2 DTensor shards) into the same-named
        parameters of ``plain``, an unsharded copy of the same module (a collective: one
        all-gather per parameter, on every rank)."""
        targets = dict(plain.named_parameters())
        for name, param in sharded.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            targets[name].copy_(full)

    def unshard_for_saving(self, model: nn.Module) -> None:
        """Replace the sharded parameters by full ones, in place, on every rank (a
        collective), so ``save_pretrained`` writes a plain HF directory. The model is
        not trained after this."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, param in list(model.named_parameters()):
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                full = nn.Parameter(state[name].detach().clone(), param.requires_grad)
                setattr(owner, attr, full)
        if hasattr(model, "tie_weights"):
            model.tie_weights()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (same keys on every rank)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        # NCCL reduces only GPU tensors
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)
        return {k: float(v) / self.world_size for k, v in zip(keys, packed, strict=True)}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (lists, tuples, dicts, dataclasses) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def _decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the classes HF lists in ``_no_split_modules``."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    return [sub for sub in module.modules() if type(sub).__name__ in names]


def _fully_shard(module: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: each decoder layer one parameter group, ``module`` (the loss) the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in _decoder_layers(module):
        fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


@dataclass(frozen=True)
class Launch:
    """Where ``torchrun`` placed this process, read from its environment variables
    (unset: one process of one)."""

    world_size: int = 1  # WORLD_SIZE
    rank: int = 0  # RANK, read when WORLD_SIZE > 1
    local_rank: int = 0  # LOCAL_RANK: the process's index on its machine
    local_world_size: int = 1  # LOCAL_WORLD_SIZE (default WORLD_SIZE): processes on it


def launch() -> Launch:
    """This process's :class:`Launch`; an :class:`InputError` naming the variable when
    one is not an integer or out of range (a traceback inside torch otherwise)."""
    world_size = _env_int("WORLD_SIZE", 1, least=1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size == 1:
        return Launch(local_rank=local_rank)
    rank = _env_int("RANK", 0)  # init_process_group reads it from the environment
    if rank >= world_size:
        raise InputError(
            f"is {rank}, but WORLD_SIZE is {world_size}", path="environment", field="RANK"
        )
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size, least=1)
    return Launch(world_size, rank, local_rank, local_world_size)


def _env_int(name: str, default: int, least: int = 0) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InputError(
            f"expects an integer, got {text!r}", path="environment", field=name
        ) from None
    if value < least:
        raise InputError(f"must be >= {least}, got {value}", path="environment", field=name)
    return value


def require_split(job: Distributed, count: int, field: str) -> None:
    """Under several ranks ``count`` (a per-update batch) must split evenly."""
    if job.enabled and count % job.world_size:
        raise InputError(
            f"{count} does not split evenly over {job.world_size} processes",
            path="config",
            field=field,
        )


def setup(
    mode: str,
    batch_size: int,
    field: str = "batch_size",
    device: torch.device | str = "cpu",
) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``device`` is where this rank computes (the recipe's resolved ``device=``): NCCL on
    a GPU, gloo on the CPU."""
    device = torch.device(device)
    world_size = launch().world_size
    if world_size == 1:
        return Distributed(device=device)
    if mode == "none":
        raise InputError(
            f"the run was launched on {world_size} processes; set distributed=ddp or fsdp",
            path="config",
            field="distributed",
        )
    if batch_size % world_size:
        raise InputError(
            f"global batch {batch_size} does not split evenly over {world_size} processes",
            path="config",
            field=field,
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # torn down before the interpreter is: a process group still alive at exit
        # left gloo's threads to be destroyed unjoined, and a rank aborted (SIGABRT)
        # after its run had finished
        atexit.register(_leave_process_group)
    return Distributed(
        rank=dist.get_rank(), world_size=dist.get_world_size(), mode=mode, device=device
    )


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(job: Distributed) -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. creating the run directory); the others wait."""
    if not job.is_main:
        job.barrier()
    yield job.is_main
    if job.is_main:
        job.barrier()
