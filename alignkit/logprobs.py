"""Log-probabilities of given tokens, computed only where they are needed.

The LM head of a 49k-vocabulary model dominates memory if it runs over every
position: (tokens x 49,152) fp32 logits. Here the backbone runs once, the hidden
states at completion positions are gathered, and the head runs over them in
chunks, so only ``chunk_size x V`` logits exist at a time.

Rows that share a prompt (chosen and rejected of a DPO pair, the k samples of one
prompt in a rollout) share its forward pass: when it saves work, each group of rows
with identical tokens before their first scored token is packed into one sequence
``[prompt, completion_1, ..., completion_k]`` whose attention mask lets every
completion see the prompt and itself only, with the position ids each row had. The
causal model computes exactly the states of the plain batch, on fewer tokens.
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


@dataclass
class _Packing:
    """Rows sharing a prompt packed into one sequence each: G packed rows of width W."""

    input_ids: torch.Tensor  # (G, W)
    position_ids: torch.Tensor  # (G, W)
    attention_mask: torch.Tensor  # (G, 1, W, W) bool, True = may attend
    index: torch.Tensor  # (B, T) long: flat index into (G * W) of each original position


# A packed layout is used only when its estimated cost is below this share of the
# plain batch's (the mask and index building are not free).
_PACKING_GAIN = 0.85


def _forward_cost(rows: int, width: int, hidden: int, per_token: float) -> float:
    """Rough FLOPs of one forward over ``rows x width`` tokens with a dense attention mask."""
    return rows * width * per_token + rows * width * width * 4.0 * hidden


def _pack_shared_prompts(
    backbone: nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    scored: torch.Tensor,  # (B, T) bool
    position_ids: torch.Tensor,  # (B, T)
) -> _Packing | None:
    """The packed layout of the batch, or None when it would not save work."""
    batch, width = input_ids.shape
    config = getattr(backbone, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if batch < 2 or implementation not in ("sdpa", "eager") or input_ids.device.type != "cpu":
        return None
    if backbone._forward_hooks or backbone._forward_pre_hooks:
        return None  # a hook reads (B, T, H) states from the backbone: keep that layout
    columns = torch.arange(width)
    has_scored = scored.any(-1)
    first = torch.where(has_scored, scored.long().argmax(-1), width)  # (B,) first scored column
    last = torch.where(attention_mask.bool(), columns, -1).amax(-1)  # (B,) last attended column
    end = torch.maximum(last + 1, first)  # (B,) a row's tokens are [0, end)
    first_list, end_list = first.tolist(), end.tolist()
    ids_rows, mask_rows, position_rows = (
        input_ids.tolist(),
        attention_mask.tolist(),
        position_ids.tolist(),
    )
    groups: dict[tuple, list[int]] = {}
    for row in range(batch):
        start = first_list[row]
        key = (
            start,
            tuple(ids_rows[row][:start]),
            tuple(mask_rows[row][:start]),
            tuple(position_rows[row][:start]),
        )
        groups.setdefault(key, []).append(row)
    if len(groups) == batch:
        return None
    members = list(groups.values())
    packed_widths = [
        first_list[rows[0]] + sum(end_list[r] - first_list[rows[0]] for r in rows)
        for rows in members
    ]
    packed_width = max(packed_widths)
    hidden = int(getattr(config, "hidden_size", 1))
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    per_token = 2.0 * (4 * hidden * hidden + 3 * hidden * intermediate)
    plain = _forward_cost(batch, width, hidden, per_token)
    packed = _forward_cost(len(members), packed_width, hidden, per_token)
    if packed > _PACKING_GAIN * plain:
        return None

    count = len(members)
    packed_ids = torch.zeros((count, packed_width), dtype=input_ids.dtype)
    packed_positions = torch.zeros((count, packed_width), dtype=position_ids.dtype)
    valid = torch.zeros((count, packed_width), dtype=torch.bool)  # key may be attended
    order = torch.full((count, packed_width), 1 << 30, dtype=torch.long)  # original column
    segment = torch.full((count, packed_width), -1, dtype=torch.long)  # 0 = prompt, j = row j
    index = torch.zeros((batch, width), dtype=torch.long)
    for group, rows in enumerate(members):
        start = first_list[rows[0]]
        base = group * packed_width
        head = rows[0]
        packed_ids[group, :start] = input_ids[head, :start]
        packed_positions[group, :start] = position_ids[head, :start]
        valid[group, :start] = attention_mask[head, :start].bool()
        order[group, :start] = columns[:start]
        segment[group, :start] = 0
        offset = start
        for number, row in enumerate(rows, start=1):
            stop = end_list[row]
            span = stop - start
            packed_ids[group, offset : offset + span] = input_ids[row, start:stop]
            packed_positions[group, offset : offset + span] = position_ids[row, start:stop]
            valid[group, offset : offset + span] = attention_mask[row, start:stop].bool()
            order[group, offset : offset + span] = columns[start:stop]
            segment[group, offset : offset + span] = number
            index[row, :start] = base + columns[:start]
            index[row, start:stop] = base + offset + torch.arange(span)
            offset += span
    same_segment = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    causal = order[:, None, :] <= order[:, :, None]
    allowed = valid[:, None, :] & same_segment & causal  # (G, W, W): query x key
    # Every query keeps itself, so padding and left-pad rows never see an empty softmax.
    allowed |= torch.eye(packed_width, dtype=torch.bool)
    return _Packing(
        input_ids=packed_ids.to(input_ids.device),
        position_ids=packed_positions.to(input_ids.device),
        attention_mask=allowed[:, None].to(input_ids.device),
        index=index.to(input_ids.device),
    )


def _hidden_states(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    scored: torch.Tensor,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last hidden states, and the map from (row, column) into them when packed.

    Plain: (B, T, H) and None. Packed: (G * W, H) and the (B, T) index.
    """
    packing = _pack_shared_prompts(backbone, input_ids, attention_mask, scored, position_ids)
    if packing is None:
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        return hidden, None
    mask = packing.attention_mask
    if backbone.config._attn_implementation == "eager":
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        mask = additive.masked_fill(~mask, torch.finfo(torch.float32).min)
    hidden = backbone(
        input_ids=packing.input_ids,
        attention_mask=mask,
        position_ids=packing.position_ids,
        use_cache=False,
    ).last_hidden_state  # (G, W, H)
    return hidden.reshape(-1, hidden.shape[-1]), packing.index


def last_token_states(
    backbone: nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    completion_mask: torch.Tensor,  # (B, T) 1 at completion tokens
) -> torch.Tensor:
    """The backbone's last hidden state at each row's last attended token. -> (B, H)

    What a sequence classifier (a reward model) reads its score from. Rows sharing the
    tokens before their completion (chosen and rejected of a pair) share that prompt's
    forward pass, as in :func:`token_logps`.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    scored = completion_mask.bool().clone()
    scored[:, 0] = False
    hidden, index = _hidden_states(backbone, input_ids, attention_mask, scored, position_ids)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(attention_mask.bool(), columns, -1).amax(-1)  # (B,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if index is None:
        return hidden[rows, last]
    return hidden[index[rows, last]]


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
    scored = target_mask.bool().clone()
    scored[:, 0] = False
    hidden, index = _hidden_states(backbone, input_ids, attention_mask, scored, position_ids)
    rows, cols = scored.nonzero(as_tuple=True)  # positions t whose token is scored
    if index is None:
        states = hidden[rows, cols - 1]  # (N, H): the state that predicts token t
    else:
        states = hidden[index[rows, cols - 1]]
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
    logps = states.new_zeros(input_ids.shape, dtype=torch.float32)
    if picked:
        logps = logps.index_put((rows, cols), torch.cat(picked))
    entropy = None
    if with_entropy:
        entropy = states.new_zeros(input_ids.shape, dtype=torch.float32)
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
