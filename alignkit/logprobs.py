"""Log-probabilities of given tokens, computed only where they are needed.

The LM head of a 49k-vocabulary model dominates memory if it runs over every
position: (tokens x 49,152) fp32 logits. Here the backbone runs once, the hidden
states at completion positions are gathered, and the head runs over them in
chunks, so only ``chunk_size x V`` logits exist at a time.

The backbone sees the batch's real tokens only, as one flat sequence, when that
saves work (on the CPU, for Llama, Mistral and Qwen2 models with the sdpa or eager
attention): no padding, and rows that
share a prompt (chosen and rejected of a DPO pair, the k samples of one prompt in a
rollout) share its forward pass, ``[prompt, completion_1, ..., completion_k]``. The
attention runs per row with the position ids each row had: the first row of a group
causally over the prompt and its completion (``is_causal``, so the CPU kernel skips
the blocks above the diagonal), each further completion over the prompt and itself.
The model computes exactly the states of the plain batch, on fewer tokens and fewer
attention scores. On HH-RLHF pairs at max_length 512 this cut a reward-model step and
a DPO step by about a third (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


class _Call(NamedTuple):
    """One row's attention in the flat layout: its queries [start, stop) of the sequence.

    The first row of a group: the prompt and its completion, causally (``prompt`` 0,
    ``mask`` None, ``is_causal``). A further row: its completion's queries over the
    group's first ``prompt`` tokens (the head of call ``piece``'s range) and then itself,
    under ``mask`` (queries, prompt + queries).
    """

    start: int
    stop: int
    prompt: int
    mask: torch.Tensor | None
    piece: int


@dataclass
class _Packing:
    """The batch's real tokens as one flat sequence, rows sharing a prompt sharing it.

    ``calls`` is the attention plan, one :class:`_Call` per row of the batch that has
    tokens of its own; their query ranges tile the flat sequence in order.
    """

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    index: torch.Tensor  # (B, T) long: flat index into N of each original (real) position
    calls: list[_Call]
    groups: int  # sequences that share a prompt (or rows alone)


# The flat layout is used only when its estimated cost is below this share of the
# plain batch's (the plan building and the per-row attention calls are not free).
_PACKING_GAIN = 0.85
# Model types whose attention is plain causal softmax attention (with rotary positions),
# which the flat layout's per-row calls reproduce.
_PLAIN_ATTENTION = ("llama", "mistral", "qwen2")
# The attention function of the flat layout, as transformers' AttentionInterface knows it.
_VARLEN = "alignkit_varlen"


# A call over at most this many keys materialises its scores (:class:`_ScoredAttention`);
# a longer one runs SDPA's flash kernel. At 9 heads of 64 on this CPU (bf16, forward +
# backward) the scores are 2.5x faster at 250 keys and even with flash at ~800.
_SCORED_KEYS = 640


class _ScoredAttention(torch.autograd.Function):
    """One call's softmax attention with its scores as a matrix, recomputed for backward.

    ``query`` (1, heads, n, D) over ``key``/``value`` (1, kv_heads, L, D); the query heads
    sharing a key/value head are stacked along the rows of one product, so nothing is
    repeated. ``bias`` (heads/kv_heads x n, L) is 0 where a query sees a key and -inf
    elsewhere. Scores are products in the inputs' dtype and the softmax runs in fp32, as
    the eager attention of transformers computes them. For short rows this is the faster
    way on the CPU: the flash kernel's tiles are small there and its backward runs
    several times its forward. Backward recomputes the probabilities from q and k (one
    product and one softmax) instead of saving them, so the memory is flash's.
    """

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, query, key, value, bias, scale: float):
        _, heads, n, dim = query.shape
        kv_heads = key.shape[1]
        grouped = query.reshape(kv_heads, heads // kv_heads * n, dim)
        keys, values = key[0], value[0]
        probs = _probabilities(grouped, keys, bias, scale)
        ctx.save_for_backward(grouped, keys, values, bias)
        ctx.scale = scale
        return torch.bmm(probs, values).view(1, heads, n, dim)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        grouped, keys, values, bias = ctx.saved_tensors
        grad_out = grad_out.to(grouped.dtype)
        probs = _probabilities(grouped, keys, bias, ctx.scale)
        grad_grouped = grad_out.reshape(grouped.shape)
        grad_values = torch.bmm(probs.transpose(1, 2), grad_grouped)
        grad_probs = torch.bmm(grad_grouped, values.transpose(1, 2))
        # d scores = P * (dP - rowsum(dP * P)), times the scale the scores had
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_scores.mul_(ctx.scale)
        grad_query = torch.bmm(grad_scores, keys).view(grad_out.shape)
        grad_keys = torch.bmm(grad_scores.transpose(1, 2), grouped)[None]
        return grad_query, grad_keys, grad_values[None], None, None


def _probabilities(grouped, keys, bias, scale: float) -> torch.Tensor:
    """softmax(q k^T x scale + bias) in fp32, returned in the inputs' dtype."""
    scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=scale)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(grouped.dtype)


def _scores_bias(queries: int, keys: int, groups: int, dtype, device) -> torch.Tensor:
    """(groups x queries, keys): 0 where query i sees key j (j <= i + keys - queries), else -inf."""
    seen = torch.ones((queries, keys), dtype=torch.bool, device=device).tril(keys - queries)
    bias = torch.zeros((queries, keys), dtype=dtype, device=device)
    return bias.masked_fill_(~seen, float("-inf")).repeat(groups, 1)


def _varlen_attention(
    module: nn.Module,
    query: torch.Tensor,  # (1, heads, N, D)
    key: torch.Tensor,  # (1, kv_heads, N, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # the placeholder carrying the plan
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the flat layout of :class:`_Packing`: each row's own calls. -> (1, N, heads, D)"""
    calls = getattr(attention_mask, "alignkit_calls", None)
    if calls is None:
        raise RuntimeError("alignkit's flat attention ran without its plan")
    # One split per tensor, not a slice per call: autograd then joins the pieces'
    # gradients with one cat instead of adding a full-size zero-padded tensor per slice.
    sizes = [call.stop - call.start for call in calls]
    queries = query.split(sizes, dim=2)
    key_pieces, value_pieces = key.split(sizes, dim=2), value.split(sizes, dim=2)
    biases = attention_mask.alignkit_biases  # per call and dtype, shared by the layers
    groups = query.shape[1] // key.shape[1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # the dtype SDPA would compute in: autocast's when it is on (q, k, v may be fp32 then)
    autocast = torch.is_autocast_enabled(query.device.type)
    dtype = torch.get_autocast_dtype(query.device.type) if autocast else query.dtype
    outputs = []
    for number, (_, _, prompt, mask, piece) in enumerate(calls):
        keys, values = key_pieces[number], value_pieces[number]
        if prompt:  # the head of its group's first piece
            keys = torch.cat([key_pieces[piece][:, :, :prompt], keys], dim=2)
            values = torch.cat([value_pieces[piece][:, :, :prompt], values], dim=2)
        if keys.shape[2] <= _SCORED_KEYS and not dropout:
            bias = biases.get((number, dtype))
            if bias is None:
                bias = _scores_bias(sizes[number], keys.shape[2], groups, dtype, query.device)
                biases[(number, dtype)] = bias
            pieces = (t.to(dtype) for t in (queries[number], keys, values))
            outputs.append(_ScoredAttention.apply(*pieces, bias, scale))
            continue
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                queries[number],
                keys,
                values,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=True,
            )
        )
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2), None


def _register_varlen() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_VARLEN, _varlen_attention)  # one dict entry, idempotent


def _plain_cost(rows: int, width: int, hidden: int, per_token: float) -> float:
    """Rough FLOPs of one forward over ``rows x width`` tokens with a dense attention mask."""
    return rows * width * per_token + rows * width * width * 4.0 * hidden


def _pack_shared_prompts(
    backbone: nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    scored: torch.Tensor,  # (B, T) bool
    position_ids: torch.Tensor,  # (B, T)
) -> _Packing | None:
    """The flat layout of the batch, or None when it would not save work."""
    batch, width = input_ids.shape
    config = getattr(backbone, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager") or input_ids.device.type != "cpu":
        return None
    if getattr(config, "model_type", None) not in _PLAIN_ATTENTION:
        return None  # softcapping, sliding windows, ...: the attention here would differ
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and width > window:
        return None
    if backbone._forward_hooks or backbone._forward_pre_hooks:
        return None  # a hook reads (B, T, H) states from the backbone: keep that layout
    if getattr(backbone, "gradient_checkpointing", False):
        return None  # a recomputed layer would run outside the plan
    columns = torch.arange(width)
    has_scored = scored.any(-1)
    first = torch.where(has_scored, scored.long().argmax(-1), width)  # (B,) first scored column
    real = attention_mask.bool()
    first_list = first.tolist()
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
    members = list(groups.values())
    lengths = real.sum(-1).tolist()
    prompt_lengths = [int(real[rows[0], : first_list[rows[0]]].sum()) for rows in members]
    hidden = int(getattr(config, "hidden_size", 1))
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    per_token = 2.0 * (4 * hidden * hidden + 3 * hidden * intermediate)
    packed = 0.0
    for rows, prompt in zip(members, prompt_lengths, strict=True):
        own = [lengths[r] - prompt for r in rows]
        tokens = prompt + sum(own)
        pairs = (prompt + own[0]) ** 2 / 2 + sum(n * (prompt + n / 2) for n in own[1:])
        packed += tokens * per_token + pairs * 4.0 * hidden
    if packed > _PACKING_GAIN * _plain_cost(batch, width, hidden, per_token):
        return None

    flat_ids, flat_positions, calls = [], [], []
    index = torch.zeros((batch, width), dtype=torch.long)
    offset = 0
    for rows, prompt in zip(members, prompt_lengths, strict=True):
        start = first_list[rows[0]]
        head = rows[0]
        prompt_columns = columns[:start][real[head, :start]]
        flat_ids.append(input_ids[head, prompt_columns])
        flat_positions.append(position_ids[head, prompt_columns])
        prompt_span = (offset, offset + prompt)
        offset += prompt
        first_call = len(calls)
        for number, row in enumerate(rows):
            own_columns = columns[start:][real[row, start:]]
            span = (offset, offset + len(own_columns))
            flat_ids.append(input_ids[row, own_columns])
            flat_positions.append(position_ids[row, own_columns])
            index[row, prompt_columns] = torch.arange(*prompt_span)
            index[row, own_columns] = torch.arange(*span)
            if number == 0 and span[1] > prompt_span[0]:  # prompt + first completion, causal
                calls.append(_Call(prompt_span[0], span[1], 0, None, first_call))
            elif span[1] > span[0]:  # the prompt, then itself causally
                n = span[1] - span[0]
                mask = torch.ones((n, prompt + n), dtype=torch.bool)
                mask[:, prompt:] = torch.ones((n, n), dtype=torch.bool).tril()
                mask = mask.to(input_ids.device)
                calls.append(_Call(span[0], span[1], prompt, mask, first_call))
            offset = span[1]
    device = input_ids.device
    return _Packing(
        input_ids=torch.cat(flat_ids)[None].to(device),
        position_ids=torch.cat(flat_positions)[None].to(device),
        index=index.to(device),
        calls=calls,
        groups=len(members),
    )


def _hidden_states(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    scored: torch.Tensor,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last hidden states, and the map from (row, column) into them when packed.

    Plain: (B, T, H) and None. Packed: (N, H) and the (B, T) index.
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
    _register_varlen()
    # a prepared 4-D mask passes through transformers untouched: it carries the plan
    plan = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
    plan.alignkit_calls = packing.calls
    plan.alignkit_biases = {}
    config = backbone.config
    implementation = config._attn_implementation
    config._attn_implementation = _VARLEN
    try:
        hidden = backbone(
            input_ids=packing.input_ids,
            attention_mask=plan,
            position_ids=packing.position_ids,
            use_cache=False,
        ).last_hidden_state  # (1, N, H)
    finally:
        config._attn_implementation = implementation
    return hidden[0], packing.index


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


class _HeadLogps(torch.autograd.Function):
    """log softmax(states @ W.T / t)[target] for a chunk of states, in fewer passes.

    Saves the bf16 (the weights' dtype) logits and the log-normaliser instead of
    autograd's fp32 logits and exp, and builds the logits' gradient in place:
    ``g * (onehot(target) - softmax) / t``. The same operations as the plain path
    forward; backward within rounding of autograd's (tests/test_logprobs.py).
    """

    @staticmethod
    def forward(ctx, states, weight, targets, temperature: float, with_entropy: bool):
        logits = torch.nn.functional.linear(states, weight)  # (n, V) in the weights' dtype
        wide = logits.float()
        if temperature != 1.0:
            wide = wide / temperature
        log_norm = torch.logsumexp(wide, dim=-1)  # (n,)
        logp = wide.gather(-1, targets[:, None]).squeeze(-1) - log_norm
        entropy = None
        if with_entropy:
            entropy = log_norm - (torch.softmax(wide, dim=-1) * wide).sum(-1)
            ctx.mark_non_differentiable(entropy)
        del wide
        ctx.save_for_backward(states, weight, targets, logits, log_norm)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        states, weight, targets, logits, log_norm = ctx.saved_tensors
        temperature = ctx.temperature
        scale = grad_logp / temperature  # (n,)
        grad = logits.float()
        if temperature != 1.0:
            grad.div_(temperature)
        grad.sub_(log_norm[:, None]).exp_().mul_(-scale[:, None])  # -g softmax / t
        grad.scatter_add_(-1, targets[:, None], scale[:, None])  # + g onehot / t
        grad = grad.to(weight.dtype)
        grad_states = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ states if ctx.needs_input_grad[1] else None
        return grad_states, grad_weight, None, None, None


def _fusable_head(head: nn.Module, states: torch.Tensor) -> bool:
    """A bias-free linear head whose weight has the states' dtype (and autocast's, if on)."""
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    dtype, device = head.weight.dtype, states.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != dtype:
        return False  # autocast casts fp32 weights for the matmul: the plain path
    return dtype == states.dtype


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
    fused = _fusable_head(head, states)
    for start in range(0, states.shape[0], chunk_size):
        chunk, chunk_targets = (
            states[start : start + chunk_size],
            targets[start : start + chunk_size],
        )
        if fused:
            logp, chunk_entropy = _HeadLogps.apply(
                chunk, head.weight, chunk_targets, temperature, with_entropy
            )
            picked.append(logp)
            entropies.append(chunk_entropy)
            continue
        logits = head(chunk).float()  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        log_norm = torch.logsumexp(logits, dim=-1)  # (n,)
        picked.append(logits.gather(-1, chunk_targets[:, None]).squeeze(-1) - log_norm)
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
