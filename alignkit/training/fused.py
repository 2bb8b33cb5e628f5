"""Llama-family MLP and RMSNorm as autograd functions that save less for backward.

Through autograd, ``down(silu(gate(x)) * up(x))`` saves per token and layer the
input, ``gate``, ``silu(gate)``, ``up`` and their product (the input of ``down``):
four tensors of the intermediate width, the largest share of what a reward-model or
DPO step on SmolLM2 keeps for backward (docs/benchmarks.md). :class:`SwiGLU` saves the input,
``gate`` and ``up`` and recomputes the two elementwise products in backward (no
matmul is recomputed). The Hugging Face RMSNorm upcasts its input and saves the fp32
copy and the bf16 normalised one; :class:`RMSNorm` saves the bf16 input and one fp32
scale per token and recomputes the rest. Both forwards are the same operations as
the modules they replace, so losses are identical and gradients equal autograd's to
bf16 rounding (tests/test_fused.py).

:func:`fused_layers` swaps them into the MLPs (plain bias-free ``nn.Linear``
projections, SiLU) and RMSNorms of Llama, Mistral and Qwen2 models whose weights are
bf16 (the training loop's :func:`alignkit.models.bf16_compute`); LoRA-wrapped
projections and other layers keep their own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(torch.autograd.Function):
    """``down(silu(x @ gate.T) * (x @ up.T))``, saving x, gate and up. (..., H) -> (..., H)"""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight):  # x (..., H); weights (I, H), (H, I)
        gate = F.linear(x, gate_weight)  # (..., I)
        up = F.linear(x, up_weight)
        out = F.linear(F.silu(gate) * up, down_weight)  # (..., H)
        ctx.save_for_backward(x, gate, up, gate_weight, up_weight, down_weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, up, gate_weight, up_weight, down_weight = ctx.saved_tensors
        needs_x, needs_gate, needs_up, needs_down = ctx.needs_input_grad
        silu = F.silu(gate)  # recomputed, as is its product with up
        grad_hidden = F.linear(grad_out, down_weight.t())  # (..., I)
        grad_down = None
        if needs_down:
            hidden = (silu * up).reshape(-1, up.shape[-1])  # (n, I)
            grad_down = grad_out.reshape(-1, grad_out.shape[-1]).t() @ hidden  # (H, I)
            del hidden
        grad_up = grad_hidden * silu
        del silu
        # autograd's own kernel for d silu(gate) / d gate
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        del grad_hidden
        flat_x = x.reshape(-1, x.shape[-1])  # (n, H)
        grad_x = grad_gate_weight = grad_up_weight = None
        if needs_x:
            grad_x = F.linear(grad_gate, gate_weight.t()) + F.linear(grad_up, up_weight.t())
        if needs_gate:
            grad_gate_weight = grad_gate.reshape(-1, gate.shape[-1]).t() @ flat_x  # (I, H)
        if needs_up:
            grad_up_weight = grad_up.reshape(-1, up.shape[-1]).t() @ flat_x
        return grad_x, grad_gate_weight, grad_up_weight, grad_down


class RMSNorm(torch.autograd.Function):
    """``weight * (x / rms(x))`` computed in fp32 as the HF module does, saving x and 1 / rms.

    Forward and backward write few full-size tensors: the fp32 copy of ``x`` is
    squared in place, and products are rounded to bf16 as they are written
    (``torch.mul(..., out=)``), which is where the HF module rounds them.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):  # x (..., H) bf16, weight (H,)
        squares = x.to(_wide(x), copy=True)  # (squared in place below)
        variance = squares.pow_(2).mean(-1, keepdim=True)  # (..., 1)
        del squares
        scale = torch.rsqrt(variance + eps)
        ctx.save_for_backward(x, scale, weight)
        normed = torch.mul(x, scale, out=torch.empty_like(x))  # (x * scale) in fp32, rounded
        return normed.mul_(weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:  # as autograd: in the output's dtype, summed over tokens
            normed = torch.mul(x, scale, out=torch.empty_like(x))  # the forward's, recomputed
            grad_weight = normed.mul_(grad_out).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
            del normed
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_out * weight).to(_wide(x))  # the product, then upcast
            normed = x.to(grad_normed.dtype, copy=True).mul_(scale)  # (..., H) fp32, recomputed
            mean = (grad_normed * normed).mean(-1, keepdim=True)  # (..., 1)
            grad_x = torch.mul(
                grad_normed.addcmul_(normed, mean, value=-1), scale, out=x.new_empty(x.shape)
            )
        return grad_x, grad_weight, None


def _wide(x: torch.Tensor) -> torch.dtype:
    """The dtype the norm computes in: fp32 (as the HF module), or x's own when wider."""
    return torch.promote_types(x.dtype, torch.float32)


_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _fusable_mlp(module: nn.Module) -> bool:
    if type(module).__name__ not in _MLPS:
        return False
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(type(p) is not nn.Linear or p.bias is not None for p in projections):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _bf16_input(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """``x`` as the fused function takes it, or None where the module's own forward must run."""
    if not torch.is_grad_enabled() or any(w.dtype != torch.bfloat16 for w in weights):
        return None  # no-grad, or autocast over fp32 weights
    return x.to(torch.bfloat16)


def _mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weights = (module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight)
    fused_input = _bf16_input(x, weights)
    if fused_input is None:
        return type(module).forward(module, x)
    return SwiGLU.apply(fused_input, *weights)


def _norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or _bf16_input(x, (module.weight,)) is None:
        return type(module).forward(module, x)
    return RMSNorm.apply(x, module.weight, module.variance_epsilon)


@contextlib.contextmanager
def fused_layers(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block the fusable MLPs and RMSNorms of ``model`` run the functions above.

    Yields how many modules were swapped.
    """
    patched = []
    if enabled:
        for module in model.modules():
            if _fusable_mlp(module):
                module.forward = _mlp_forward.__get__(module)
            elif type(module).__name__ in _NORMS and hasattr(module, "variance_epsilon"):
                module.forward = _norm_forward.__get__(module)
            else:
                continue
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            vars(module).pop("forward", None)
