"""Chunked completion-only log-probs equal a plain full-logits computation."""

from __future__ import annotations

import torch

from alignkit.logprobs import sequence_logps, token_logps
from alignkit.models import load_policy


def _reference_logps(model, input_ids, attention_mask, target_mask, temperature):
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
    ).logits
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logps[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return picked * target_mask[:, 1:]


def test_chunked_logps_match_full_logits(tiny_model):
    torch.manual_seed(0)
    model = load_policy(tiny_model)
    input_ids = torch.randint(3, 2000, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # a left-padded row
    target_mask = torch.zeros_like(input_ids)
    target_mask[:, 7:] = 1
    for temperature in (1.0, 0.7):
        expected = _reference_logps(model, input_ids, attention_mask, target_mask, temperature)
        got = token_logps(model, input_ids, attention_mask, target_mask, temperature, chunk_size=5)
        assert torch.allclose(got.logps[:, 1:], expected, atol=1e-5)
        assert (got.logps[:, :7] == 0).all()
    sums, counts = sequence_logps(model, input_ids, attention_mask, target_mask)
    expected = _reference_logps(model, input_ids, attention_mask, target_mask, 1.0)
    assert torch.allclose(sums, expected.sum(-1), atol=1e-4)
    assert counts.tolist() == [5.0, 5.0, 5.0]


def test_entropy_of_uniform_head_is_log_vocab(tiny_model):
    model = load_policy(tiny_model)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()  # all logits equal -> uniform distribution
    input_ids = torch.randint(3, 2000, (1, 6))
    mask = torch.ones_like(input_ids)
    got = token_logps(model, input_ids, mask, mask, with_entropy=True)
    vocab = head.weight.shape[0]
    assert torch.allclose(
        got.entropy[0, 1:], torch.full((5,), float(torch.log(torch.tensor(vocab)))), atol=1e-4
    )
    assert torch.allclose(
        got.logps[0, 1:], torch.full((5,), -float(torch.log(torch.tensor(vocab)))), atol=1e-4
    )


def _loss_and_grads(model, args, temperature):
    model.zero_grad()
    got = token_logps(model, *args, temperature=temperature, chunk_size=4, with_entropy=True)
    weights = torch.linspace(-1.0, 2.0, got.logps.numel()).reshape(got.logps.shape)
    (got.logps * weights).sum().backward()  # a different weight on every position's log-prob
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return got, grads


def test_fused_head_gives_autograds_logps_entropies_and_gradients(tiny_model, monkeypatch):
    from alignkit import logprobs
    from alignkit.models import bf16_compute

    torch.manual_seed(1)
    model = load_policy(tiny_model)
    input_ids = torch.randint(3, 2000, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0
    target_mask = torch.zeros_like(input_ids)
    target_mask[:, 5:] = 1
    args = (input_ids, attention_mask, target_mask)
    for bf16 in (False, True):
        with bf16_compute(model, enabled=bf16):
            fused, fused_grads = _loss_and_grads(model, args, 0.7)
            with monkeypatch.context() as patch:
                patch.setattr(logprobs, "_fusable_head", lambda head, states: False)
                plain, plain_grads = _loss_and_grads(model, args, 0.7)
        assert torch.equal(fused.logps, plain.logps)  # the forward is the same operations
        assert torch.allclose(fused.entropy, plain.entropy, atol=1e-5)
        assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
        for name, grad in plain_grads.items():
            tolerance = 2e-2 * grad.abs().max() + 1e-6 if bf16 else 1e-6 + 1e-5 * grad.abs().max()
            assert (fused_grads[name] - grad).abs().max() <= tolerance, (name, bf16)
