"""The fused MLP and RMSNorm against autograd through the Hugging Face modules they replace."""

from __future__ import annotations

import copy

import torch

from alignkit.models import bf16_compute, load_reward_backbone
from alignkit.recipes.reward import make_reward_loss
from alignkit.training.fused import RMSNorm, SwiGLU, fused_layers


def _weights(dtype, hidden=6, inner=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 4, hidden), (inner, hidden), (inner, hidden), (hidden, inner)]
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_(True) for s in shapes]


def _reference(x, gate, up, down):
    return torch.nn.functional.silu(x @ gate.t()) * (x @ up.t()) @ down.t()


def test_swiglu_gradients_pass_gradcheck_in_float64():
    inputs = _weights(torch.float64)
    assert torch.autograd.gradcheck(SwiGLU.apply, inputs, eps=1e-6, atol=1e-7)


def test_swiglu_equals_autograd_in_fp32_and_bf16():
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        mine, theirs = _weights(dtype), _weights(dtype)
        out = SwiGLU.apply(*mine)
        expected = _reference(*theirs)
        assert torch.equal(out, _reference(*[t.detach() for t in mine]))  # the same forward
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        (out * weight).sum().backward()
        (expected * weight).sum().backward()
        for a, b in zip(mine, theirs, strict=True):
            scale = b.grad.float().abs().max()
            assert scale > 0
            assert (a.grad.float() - b.grad.float()).abs().max() <= tolerance * scale


def test_rmsnorm_equals_the_hf_module_forward_and_its_gradients():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        norm = LlamaRMSNorm(8, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        x = (3 * torch.randn(5, 8, generator=torch.Generator().manual_seed(3))).to(dtype)
        mine_x, theirs_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        weight = norm.weight.detach().clone().requires_grad_(True)
        out = RMSNorm.apply(mine_x, weight, 1e-6)
        expected = norm(theirs_x)
        assert torch.equal(out, expected)  # the same forward
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        (out * probe).sum().backward()
        (expected * probe).sum().backward()
        pairs = ((mine_x.grad, theirs_x.grad), (weight.grad, norm.weight.grad))
        for a, b in pairs:
            scale = b.float().abs().max()
            assert scale > 0
            assert (a.float() - b.float()).abs().max() <= tolerance * scale
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNorm.apply(a, b, 1e-6), (x, w))


def _saved_bytes(run) -> int:
    seen = {}

    def pack(tensor):
        seen[(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = tensor.nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def test_reward_step_same_loss_and_gradients_with_half_the_mlp_activations(tiny_model):
    model = load_reward_backbone(tiny_model)
    fused = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(5, 3000, (4, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 18:] = 0
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 10:] = 1
    completion_mask *= attention_mask
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "margin": torch.zeros(2),
    }
    loss_fn = make_reward_loss(use_margin=False, center_coef=0.0)
    losses, saved = [], []
    for module, fuse in ((model, False), (fused, True)):
        with bf16_compute(module, enabled=True), fused_layers(module, fuse) as count:
            assert count == (2 * 3 + 1 if fuse else 0)  # MLP and 2 norms a layer, final norm
            holder = {}

            def forward(module=module, holder=holder):
                holder["loss"] = loss_fn(module, batch)[0]

            saved.append(_saved_bytes(forward))
            holder["loss"].backward()
        losses.append(holder["loss"].detach())
    assert torch.equal(losses[0], losses[1])  # the forward is the same ops
    # not saved any more, per layer: silu(gate) and its product with up, (tokens, 128)
    # bf16 each; each norm's fp32 input and bf16 output for its bf16 input, (tokens, 64)
    tokens = int(attention_mask.sum())  # the forward runs the real tokens only (logprobs.py)
    assert saved[0] - saved[1] >= 2 * (2 * tokens * 128 * 2 + 2 * tokens * 64 * (4 + 2 - 2))
    for (name, a), b in zip(fused.named_parameters(), model.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None, name
            continue
        scale = b.grad.abs().max()
        assert (a.grad - b.grad).abs().max() <= 3e-2 * scale + 1e-6, name
