"""Log-probabilities of given tokens, computed only where they are needed.

The LM head of a 49k-vocabulary model dominates memory if it runs over every
position: (tokens x 49,152) fp32 logits. Here the backbone runs once, the hidden
states at completion positions are gathered, and the head runs over them in
chunks, so only ``chunk_size x V`` logits exist at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenLogps:
    """Per-token results aligned with ``input_ids``: entry t scores token t given tokens < t."""

    logps: torch.Tensor  # (B, T) fp32, zero outside the mask
    entropy: torch.Tensor | None  # (B, T) fp32 or None


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, lm_head) of a causal LM, looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    target_mask: torch.Tensor,  # (B, T) 1 where a token is scored (completion tokens)
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    position_ids: torch.Tensor | None = None,
) -> TokenLogps:
    """log pi(token_t | tokens_<t) / temperature-scaled, at the positions of ``target_mask``.

    Position 0 can never be scored (nothing predicts it). Logits are divided by
    ``temperature`` before the softmax, matching a sampler run at that temperature.
    """
    backbone, head = split_lm(model)
    if position_ids is None:
        # Left padding: positions count real tokens only.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    scored = target_mask.bool().clone()
    scored[:, 0] = False
    rows, cols = scored.nonzero(as_tuple=True)  # positions t whose token is scored
    states = hidden[rows, cols - 1]  # (N, H): the state that predicts token t
    targets = input_ids[rows, cols]  # (N,)
    picked, entropies = [], []
    for start in range(0, states.shape[0], chunk_size):
        logits = head(states[start : start + chunk_size]).float()  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        log_norm = torch.logsumexp(logits, dim=-1)  # (n,)
        target_logits = logits.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
        picked.append(target_logits - log_norm)
        if with_entropy:
            probs = torch.softmax(logits, dim=-1)
            entropies.append(log_norm - (probs * logits).sum(-1))
    logps = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    if picked:
        logps = logps.index_put((rows, cols), torch.cat(picked))
    entropy = None
    if with_entropy:
        entropy = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
        if entropies:
            entropy = entropy.index_put((rows, cols), torch.cat(entropies).detach())
    return TokenLogps(logps=logps, entropy=entropy)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of completion log-probs per row: S(y) of shape (B,) and |y| of shape (B,)."""
    result = token_logps(model, input_ids, attention_mask, target_mask, temperature, chunk_size)
    mask = target_mask.clone()
    mask[:, 0] = 0
    return result.logps.sum(-1), mask.sum(-1).to(torch.float32)
