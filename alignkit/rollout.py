"""Batched sampling with a KV cache, and log-prob scoring of what was sampled.

:func:`generate` runs the decode loop itself: a prefill of the prompts (each prompt
once, in groups of like length so little padding is computed, its cache then
repeated for its ``num_samples`` samples), then one token per step with the KV
cache; tokens every prompt starts with (a chat template's system turn) are prefilled
once and their keys and values copied to every row (:func:`shared_prefix_length`).
Rows that reach EOS emit padding and are dropped from the batch (their cache
rows with them) once enough of them have finished to pay for the copy. The cache is
preallocated for the whole rollout (no ``torch.cat`` per step) and its views cover
only the filled part, so attention never runs over empty slots. Under bf16 on CPU
the prefill and each decode step of a Llama-family decoder run through
:class:`alignkit.decode.FastDecoder` (fused products from weights packed once for
oneDNN, attention over the cache in place); other models run the HF forward, with
their linears from weights packed once per call.

:func:`score` recomputes the per-token log-probs of a :class:`Rollout` with
:func:`alignkit.logprobs.token_logps`: the forward pass a policy-gradient update
differentiates.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from alignkit.decode import FastDecoder
from alignkit.errors import InputError
from alignkit.logprobs import TokenLogps, token_logps
from alignkit.models import autocast, bf16_supported

# Finished rows stay in the batch (fed padding) until at least this fraction of it
# has finished; then the batch and its cache are compacted in one copy.
_COMPACT_FRACTION = 1 / 8
# Packing the weights costs ~0.1 CPU s per generate call (embedded model, 1 thread)
# and saves ~15 ms per decode step at batch 1: it pays from about this many steps.
_PREPACK_MIN_STEPS = 8
# One more prefill forward costs about as much as this many padded prompt tokens.
_BUCKET_OVERHEAD = 32
# Slots a rollout cache's buffers grow by at a time (_PreallocatedLayer.reserve).
_GROWTH = 32


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` (naming the field) for a value out of range."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0 (0 is greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 turns it off)"),
        ]
        for field, ok, message in checks:
            if not ok:
                value = getattr(self, field)
                raise InputError(f"{message}, got {value}", path="config", field=field)

    @property
    def scoring_temperature(self) -> float:
        """The temperature :func:`score` must use to match ``sampling_logps`` (1 for greedy)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Rollout:
    """Prompts and their sampled completions, row i*k + j = prompt i, sample j.

    Shapes: N = prompts x samples, P = longest prompt, T = decode steps taken
    (at most ``max_new_tokens``; fewer when every row hit EOS earlier).

    ``sampling_logps`` holds, at each completion token, log pi(token | prefix) under
    the temperature-scaled *full* distribution, softmax(logits / temperature): the
    quantity ``token_logps(..., temperature=temperature)`` returns, not the
    renormalised top-p / top-k distribution the token was actually drawn from.
    Greedy decoding (temperature 0) records the temperature-1 log-probs.
    """

    input_ids: torch.Tensor  # (N, P+T) left-padded prompt, completion, then padding
    attention_mask: torch.Tensor  # (N, P+T) 1 on prompt and completion tokens
    completion_mask: torch.Tensor  # (N, P+T) 1 on completion tokens up to and including EOS
    sampling_logps: torch.Tensor  # (N, P+T) fp32, zero outside completion_mask
    finished: torch.Tensor  # (N,) bool, the completion ended with EOS
    prompt_index: torch.Tensor  # (N,) long, which prompt each row answers
    completions: list[str]  # N decoded completions, special tokens removed
    completion_lengths: torch.Tensor  # (N,) long, tokens in completion_mask
    prompt_length: int  # P: completions start at this column
    temperature: float  # the sampling temperature (what score() should divide by)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


class _PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers that grow a few slots at a time.

    ``update`` writes the new states in place and returns views of the filled part,
    so there is no per-step concatenation and attention covers only real slots. The
    buffers hold the filled slots and up to ``_GROWTH`` zeros after them (grown by
    :meth:`reserve`, at most to ``capacity``): a decode step can attend over a whole
    buffer, which its batched products read without a copy, where the view of the
    filled part has the buffer's row stride and is copied by each product
    (:meth:`alignkit.decode.FastDecoder.step`).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Keys are stored in the values' dtype. Under bf16 autocast RoPE leaves keys in
        # fp32 while values are bf16, and attention casts the keys to bf16 anyway: storing
        # them cast saves re-casting the whole cache every step (same numbers, tested).
        batch, heads, _, key_dim = key_states.shape
        self.dtype, self.device = value_states.dtype, value_states.device
        self.key_buffer = value_states.new_zeros(batch, heads, 0, key_dim)
        self.value_buffer = value_states.new_zeros(
            batch, value_states.shape[1], 0, value_states.shape[-1]
        )
        self.is_initialized = True

    def reserve(self, end: int) -> None:
        """Grow the buffers (with zeros) to hold at least ``end`` slots."""
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        width = self.key_buffer.shape[2]
        if end > width:
            grown = min(self.capacity, end + _GROWTH) - width
            self.key_buffer = F.pad(self.key_buffer, (0, 0, 0, grown))
            self.value_buffer = F.pad(self.value_buffer, (0, 0, 0, grown))
            self._refresh_views()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.reserve(end)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write one token's key and value per row, (N, heads, D) each, at the next slot."""
        self.reserve(self.length + 1)
        self.key_buffer.select(2, self.length).copy_(key_states)
        self.value_buffer.select(2, self.length).copy_(value_states)
        self.appended()

    def appended(self) -> None:
        """The next slot of every row was written in place (``alignkit.native.decode_attention``)."""
        self.length += 1
        self._refresh_views()

    def start_with(self, head: _PreallocatedLayer, rows: int) -> None:
        """Begin ``rows`` rows, each holding ``head``'s slots (one row: a prefix they share)."""
        self.lazy_initialization(head.keys, head.values)
        self.key_buffer = head.keys.expand(rows, -1, -1, -1).contiguous()
        self.value_buffer = head.values.expand(rows, -1, -1, -1).contiguous()
        self.length = head.length
        self._refresh_views()

    def place(
        self, rows: torch.Tensor, piece: _PreallocatedLayer, batch: int, width: int, skip: int = 0
    ) -> None:
        """Write ``piece``'s states (its rows prefilled apart) at ``rows``, ending at ``width``.

        ``skip``: the piece's first slots, a prefix already in place here
        (:meth:`start_with`), are not copied. A slot left of a short prompt is masked
        out and holds zeros, or the states of its group's padding: finite either way,
        never uninitialised memory, which could be NaN.
        """
        if not self.is_initialized:
            self.lazy_initialization(piece.keys[:1], piece.values[:1])
            self.key_buffer = self.key_buffer.new_zeros(batch, *self.key_buffer.shape[1:])
            self.value_buffer = self.value_buffer.new_zeros(batch, *self.value_buffer.shape[1:])
        self.reserve(width)
        start = width - (piece.length - skip)
        self.key_buffer[rows, :, start:width] = piece.keys[:, :, skip:].to(self.key_buffer.dtype)
        self.value_buffer[rows, :, start:width] = piece.values[:, :, skip:]
        self.length = width
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer.narrow(2, 0, self.length)
        self.values = self.value_buffer.narrow(2, 0, self.length)

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the rollout cache is never cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._refresh_views()


def length_buckets(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Prompts grouped for prefill: index lists, each group padded to its longest.

    Minimises sum(group size x longest prompt in it) + ``overhead`` tokens per group
    (the cost of one more forward call; default ``_BUCKET_OVERHEAD``) over groups of consecutive lengths, by dynamic
    programming over the sorted lengths. One group when splitting does not pay.
    """
    overhead = _BUCKET_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    count = len(order)
    best = [0.0] + [float("inf")] * count  # best[j]: cost of the first j sorted prompts
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        for start in range(end):
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], count
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def shared_prefix_length(prompt_ids: Sequence[Sequence[int]], overhead: int | None = None) -> int:
    """How many first tokens of the prompts to prefill once for all of them (0: none).

    A chat template puts the same turns before every prompt (SmolLM2's default system
    turn is 24 of the ~44 tokens of the benchmark's HH prompts). Those tokens' keys and
    values are the same in every row (same tokens, same positions), so :func:`_prefill`
    runs them once and copies them to each row. It pays when the (B - 1) x length
    tokens saved outweigh one more forward (``overhead`` padded tokens, default
    ``_BUCKET_OVERHEAD``). Each prompt keeps at least its last token, whose logits
    start the sampling.
    """
    overhead = _BUCKET_OVERHEAD if overhead is None else overhead
    if len(prompt_ids) < 2:
        return 0
    first = prompt_ids[0]
    length = min(len(ids) for ids in prompt_ids) - 1
    for ids in prompt_ids[1:]:
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    return length if (len(prompt_ids) - 1) * length > overhead else 0


def _prefill_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Cache
) -> torch.Tensor:
    """Run left-padded prompts into ``cache``; the logits after each one's last token. (B, V)

    Slots already in ``cache`` (a shared prefix) come before the prompts and every row
    attends to them.
    """
    past = cache.get_seq_length()
    output = model(
        input_ids=input_ids,
        attention_mask=F.pad(attention_mask, (past, 0), value=1),
        position_ids=past + (attention_mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1].float()


def _prefill(
    model: nn.Module,
    cache: Cache,
    prompt_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    decoder: FastDecoder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompts into ``cache``: their last logits (B, V) and the cache's mask (B, P).

    Left padding to the longest prompt would compute every pad position. Prompts are
    run in :func:`length_buckets` groups instead, each padded to its own longest, and
    their keys and values written at their rows and columns of the cache, whose other
    slots are finite under a masked-out position: the states of the one padded batch.
    A prefix all prompts share (:func:`shared_prefix_length`) is run once and fills
    the first slots of every row; each row then holds padding, then the rest of its
    prompt, ending at column P. The mask (1 on a slot that holds a token) says so.
    """
    run = decoder.prefill if decoder is not None else functools.partial(_prefill_logits, model)
    shared = shared_prefix_length(prompt_ids)
    if shared:
        head = _new_cache(model, shared)
        prefix = torch.tensor([list(prompt_ids[0][:shared])], device=device)
        run(prefix, torch.ones_like(prefix), head)
        prompt_ids = [ids[shared:] for ids in prompt_ids]

    def started(part: Cache, rows: int) -> Cache:  # ``part`` holding the shared prefix
        if shared:
            for layer, head_layer in zip(part.layers, head.layers, strict=True):
                layer.start_with(head_layer, rows)
        return part

    own, own_mask = _left_pad(prompt_ids, pad_id, device)  # (B, P - shared)
    batch, width = own.shape
    mask = F.pad(own_mask, (shared, 0), value=1)
    groups = length_buckets([len(ids) for ids in prompt_ids])
    if len(groups) == 1:
        return run(own, own_mask, started(cache, batch)), mask
    started(cache, batch)
    logits = None
    for rows in groups:
        ids, part_mask = _left_pad([prompt_ids[i] for i in rows], pad_id, device)
        part = started(_new_cache(model, shared + ids.shape[1]), len(rows))
        last = run(ids, part_mask, part)
        if logits is None:
            logits = last.new_empty(batch, last.shape[-1])
        index = torch.tensor(rows, device=device)
        logits[index] = last
        for layer, piece in zip(cache.layers, part.layers, strict=True):
            layer.place(index, piece, batch, shared + width, skip=shared)
    return logits, mask


def _new_cache(model: nn.Module, capacity: int) -> Cache:
    config = model.config.get_text_config(decoder=True)
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)])


@contextlib.contextmanager
def _cacheable_casts(model: nn.Module) -> Iterator[None]:
    """Let autocast cache the bf16 copies of frozen fp32 weights for the whole loop.

    Autocast reuses a weight's bf16 cast across forward calls only for leaf tensors
    that require grad (and not under ``torch.inference_mode``). Without the cache a
    decode step re-casts all weights, which doubles its time at batch 1. Frozen
    weights (a LoRA base, a reference model) are flagged for the duration; under
    ``torch.no_grad`` that records nothing.
    """
    flipped = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    for parameter in flipped:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in flipped:
            parameter.requires_grad_(False)


def prepacking_supported(device: torch.device) -> bool:
    """True where oneDNN can run bf16 linears from pre-packed weights (CPU with bf16)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@contextlib.contextmanager
def _prepacked_linears(model: nn.Module, batch_hint: int, enabled: bool) -> Iterator[None]:
    """Every ``nn.Linear`` runs in bf16 from a weight reordered once for oneDNN.

    A bf16 ``F.linear`` on CPU reorders its weight into oneDNN's blocked layout at
    every call: at decode time (a few rows per call) that copy costs about as much as
    the product itself, 1.3-2x per linear here (docs/benchmarks.md). Packing each
    weight once per :func:`generate` call (the policy changes between calls) removes
    it. The result is what autocast's bf16 linear returns, bit for bit (tested):
    bf16 input, weight and bias, bf16 output. Only for no-grad use.
    """
    if not enabled:
        yield
        return
    patched = []
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Linear or module.weight.device.type != "cpu":
                continue
            weight = module.weight.detach().to(torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=batch_hint)
            bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)

            def forward(x: torch.Tensor, packed=packed, bias=bias) -> torch.Tensor:
                flat = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
                out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
                return out.view(*x.shape[:-1], out.shape[-1])

            module.forward = forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            vars(module).pop("forward", None)


def _left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P), prompts aligned to the right edge."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids: the tokenizer's EOS plus any in the model's generation config."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token")
    return sorted(ids)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf.  # (n, V) -> (n, V)

    The nucleus is the smallest set of most likely tokens whose probability reaches
    ``top_p``; the most likely token is always kept.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (n, V)
        drop_sorted = mass_before > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(
    probs: torch.Tensor, generator: torch.Generator | torch.Tensor, block: int = 256
) -> torch.Tensor:
    """One token per row of ``probs`` (n, V), by inverting the CDF at one uniform per row.

    ``torch.multinomial`` draws one exponential variate per vocabulary entry: 70 ms
    a step at 32 x 49,152 here, longer than the decode step itself. This draws one
    uniform per row and inverts the CDF in two levels, first over sums of ``block``
    tokens, then inside the chosen block, in float64 so the smallest probabilities
    keep their mass: under 1 ms. A zero-probability token is never drawn. ``probs``
    need not sum to 1 (the rows are drawn in proportion). ``generator`` may instead be
    the (n, 1) uniforms to invert (rows seeded one by one: :func:`row_uniforms`).
    """
    return _draw(probs, generator, block)[0]


def _draw(
    weights: torch.Tensor, generator: torch.Generator | torch.Tensor, block: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw`, and each row's total weight (n,) float64."""
    rows, vocab = weights.shape
    if vocab % block:
        weights = F.pad(weights, (0, (-vocab) % block))
    blocked = weights.view(rows, -1, block)  # (n, V/block, block)
    block_mass = blocked.sum(-1).double()  # (n, V/block)
    block_cdf = block_mass.cumsum(-1)
    if isinstance(generator, torch.Tensor):  # the rows' own uniforms, (n, 1)
        uniform = generator.double()
    else:
        uniform = torch.rand((rows, 1), generator=generator, device=weights.device).double()
    target = uniform * block_cdf[:, -1:]  # (n, 1) in [0, total)
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.shape[1] - 1)
    target = target - (block_cdf.gather(1, chosen) - block_mass.gather(1, chosen))
    inside = blocked.gather(1, chosen[:, :, None].expand(rows, 1, block)).squeeze(1)  # (n, block)
    inside_cdf = inside.double().cumsum(-1)
    # rounding must not push the target past the block's last token with mass
    target = torch.minimum(target, inside_cdf[:, -1:] * (1 - 1e-12))
    offset = torch.searchsorted(inside_cdf, target, right=True).clamp(max=block - 1)
    tokens = (chosen * block + offset).squeeze(-1).clamp(max=vocab - 1)
    return tokens, block_cdf[:, -1]


def row_uniforms(
    seed: int, rows: Sequence[int], steps: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(rows), steps) uniforms, row ``g`` from its own stream seeded by (seed, g).

    A row's draws then depend only on the step's seed and the row's global index, not on
    which other rows share its batch: ranks that each sample a slice of a global batch
    draw the same tokens as one process sampling all of it.
    """
    out = torch.empty((len(rows), steps), dtype=torch.float32)
    for position, row in enumerate(rows):
        row_seed = int(np.random.SeedSequence([seed, int(row)]).generate_state(1)[0])
        out[position] = torch.rand(steps, generator=torch.Generator().manual_seed(row_seed))
    return out.to(device)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (n,) and their log-probs (n,) under softmax(logits / temperature).

    ``logits`` (n, V) fp32. The log-prob is taken from the full tempered
    distribution, before top-k / top-p filtering (see :class:`Rollout`).
    """
    temperature = params.scoring_temperature
    scaled = logits / temperature if temperature != 1.0 else logits
    if params.temperature > 0.0 and params.top_k == 0 and params.top_p >= 1.0:
        # drawn from exp(scaled - max), its log-prob from their sum: one (n, V) exp
        # instead of a log-softmax and its exp (~3.5 of 7 ms a step at 32 x 49,152)
        top = scaled.amax(-1, keepdim=True)  # (n, 1)
        tokens, mass = _draw((scaled - top).exp_(), generator)
        chosen = scaled.gather(-1, tokens[:, None]) - top  # (n, 1)
        return tokens, chosen.squeeze(-1) - mass.log().to(scaled.dtype)
    log_probs = F.log_softmax(scaled, dim=-1)  # (n, V)
    if params.temperature == 0.0:
        tokens = scaled.argmax(-1)
    else:
        tokens = draw(
            torch.softmax(filter_logits(scaled, params.top_k, params.top_p), -1), generator
        )
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    num_samples: int = 1,
    bf16: bool | None = None,
    first_row: int | None = None,
    prepack: bool | None = None,
    fast_decode: bool | None = None,
) -> Rollout:
    """Sample ``num_samples`` completions for each prompt: one batch, KV cache, per-row EOS stop.

    ``prompt_ids``: B token-id lists (already rendered, e.g. by
    :func:`alignkit.data.tokenize.encode_prompt`). Returns N = B x num_samples rows,
    samples of one prompt contiguous. The same seed and inputs give the same tokens.
    ``bf16`` None = bf16 autocast where the CPU supports it; False = fp32.
    ``prepack`` None = under bf16 on CPU and for at least ``_PREPACK_MIN_STEPS`` new
    tokens, run the linears from weights packed once for oneDNN (same numbers,
    :func:`_prepacked_linears`); False = plain autocast linears.
    ``fast_decode`` None = where ``prepack`` applies and the architecture allows, each
    decode step runs through :class:`alignkit.decode.FastDecoder` (fused products from
    packed weights, attention over the cache in place) instead of the HF forward;
    True = wherever the architecture allows (fp32 too: fp32 copies of the fused
    weights); False = the HF forward. A model from :func:`alignkit.models.load_sampler`
    whose weights its decoder holds always decodes through it (``prepack`` and
    ``fast_decode`` do not apply; ``bf16=False`` is refused).

    Runs under ``torch.no_grad`` rather than ``torch.inference_mode``: under
    inference mode autocast does not keep its bf16 weight casts between steps,
    which measured 2.3x slower at batch 1 here.

    ``first_row``: when given, these rows are rows ``first_row ...`` of a larger global
    batch and each row draws from its own stream seeded by (seed, global row), so a
    slice of the batch samples what the whole batch would (:func:`row_uniforms`).
    """
    params.validate()
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    prompt_tensor, prompt_mask = _left_pad(prompt_ids, pad_id, device)  # (B, P)
    num_prompts, prompt_length = prompt_tensor.shape
    rows_total = num_prompts * num_samples
    max_steps = params.max_new_tokens

    generator: torch.Generator | torch.Tensor = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    uniforms = None
    if first_row is not None:
        global_rows = range(first_row, first_row + rows_total)
        uniforms = row_uniforms(params.seed, global_rows, max_steps, device)
    tokens = torch.full((rows_total, max_steps), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((rows_total, max_steps), dtype=torch.float32, device=device)
    finished = torch.zeros(rows_total, dtype=torch.bool, device=device)
    attention = torch.ones((rows_total, prompt_length + max_steps), dtype=torch.long, device=device)
    first_position = prompt_mask.sum(-1).repeat_interleave(num_samples)  # (N,)

    decoder = FastDecoder.owner(model)
    use_bf16 = (decoder is not None or bf16_supported(device)) if bf16 is None else bf16
    if prepack is None:
        prepack = use_bf16 and max_steps >= _PREPACK_MIN_STEPS and prepacking_supported(device)
    prepack = prepack and use_bf16
    if fast_decode is None:
        fast_decode = prepack
    # a sampling-only model's weights live in its decoder (alignkit.models.load_sampler):
    # it decodes through it at any length, and only in bf16
    if decoder is not None and not use_bf16:
        raise ValueError("this model was loaded for bf16 sampling (load_sampler); bf16=False")
    if decoder is None and fast_decode and max_steps > 1:
        if not use_bf16 or prepacking_supported(device):
            with torch.no_grad():
                decoder = FastDecoder.build(model, prompt_length + max_steps, bf16=use_bf16)
    if decoder is not None:  # one row's products from plain weights, several rows' packed
        decoder.lay_out(rows_total)
    was_training = model.training
    model.eval()
    steps = 0
    try:
        with (
            torch.no_grad(),
            autocast(device, enabled=use_bf16),
            _cacheable_casts(model),
            # the fast decoder runs the prefill and decode from its own fused packed weights
            _prepacked_linears(model, rows_total, enabled=prepack and decoder is None),
        ):
            cache = _new_cache(model, prompt_length + max_steps)
            # 1. prefill: each prompt once (prompts of like length together, so little
            # padding is computed; a prefix they share once), then its cache and logits
            # repeated per sample
            logits, cache_mask = _prefill(model, cache, prompt_ids, pad_id, device, decoder)
            attention[:, :prompt_length] = cache_mask.repeat_interleave(num_samples, dim=0)
            logits = logits.repeat_interleave(num_samples, dim=0)  # (N, V)
            cache.batch_repeat_interleave(num_samples)
            rows = torch.arange(rows_total, device=device)  # rows still in the batch
            # 2. decode one token per step
            for step in range(max_steps):
                if uniforms is not None:
                    generator = uniforms[rows, step, None]  # (n, 1)
                next_tokens, next_logps = sample_tokens(logits, params, generator)  # (n,)
                live = ~finished[rows]
                next_tokens = torch.where(live, next_tokens, pad_id)
                tokens[rows, step] = next_tokens
                logps[rows, step] = torch.where(live, next_logps, 0.0)
                finished[rows] |= live & torch.isin(next_tokens, stop_ids)
                steps = step + 1
                if steps == max_steps or bool(finished.all()):
                    break
                done_in_batch = finished[rows]
                if int(done_in_batch.sum()) >= max(1, int(len(rows) * _COMPACT_FRACTION)):
                    keep = (~done_in_batch).nonzero().squeeze(-1)
                    rows, next_tokens = rows[keep], next_tokens[keep]
                    cache.batch_select_indices(keep)
                column = prompt_length + step + 1
                positions = first_position[rows] + step  # (n,)
                if decoder is not None:
                    logits = decoder.step(next_tokens, positions, cache, attention[rows, :column])
                    continue
                output = model(
                    input_ids=next_tokens[:, None],
                    attention_mask=attention[rows, :column],
                    position_ids=positions[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = output.logits[:, -1].float()
    finally:
        model.train(was_training)
    return _assemble(
        tokenizer, prompt_tensor, prompt_mask, tokens[:, :steps], logps[:, :steps], finished,
        stop_ids, num_samples, params.scoring_temperature,
    )  # fmt: skip


def _assemble(
    tokenizer: PreTrainedTokenizerBase,
    prompt_tensor: torch.Tensor,  # (B, P)
    prompt_mask: torch.Tensor,  # (B, P)
    tokens: torch.Tensor,  # (N, T)
    logps: torch.Tensor,  # (N, T)
    finished: torch.Tensor,  # (N,)
    stop_ids: torch.Tensor,
    num_samples: int,
    temperature: float,
) -> Rollout:
    """Masks, padding after EOS, decoded text: the decode loop's buffers as a :class:`Rollout`."""
    is_stop = torch.isin(tokens, stop_ids).long()
    after_stop = (is_stop.cumsum(-1) - is_stop) > 0  # (N, T) strictly after the first EOS
    generated = (~after_stop).long()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = tokens.masked_fill(after_stop, pad_id)
    prompt_rows = prompt_tensor.repeat_interleave(num_samples, dim=0)
    prompt_mask_rows = prompt_mask.repeat_interleave(num_samples, dim=0)
    zeros = torch.zeros_like(prompt_mask_rows)
    lengths = generated.sum(-1)
    completions = tokenizer.batch_decode(
        [row[: int(n)].tolist() for row, n in zip(tokens, lengths, strict=True)],
        skip_special_tokens=True,
    )
    return Rollout(
        input_ids=torch.cat([prompt_rows, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask_rows, generated], dim=1),
        completion_mask=torch.cat([zeros, generated], dim=1),
        sampling_logps=torch.cat([zeros.float(), logps * generated], dim=1),
        finished=finished.clone(),
        prompt_index=torch.arange(prompt_tensor.shape[0], device=tokens.device).repeat_interleave(
            num_samples
        ),
        completions=completions,
        completion_lengths=lengths,
        prompt_length=prompt_tensor.shape[1],
        temperature=temperature,
    )


def score(
    model: nn.Module,
    rollout: Rollout,
    temperature: float | None = None,
    with_entropy: bool = False,
    bf16: bool | None = None,
    chunk_size: int = 1024,
) -> TokenLogps:
    """Per-token log-probs (and entropies) of the rollout's completion tokens.  # (N, P+T)

    ``temperature`` defaults to the rollout's own, so ``exp(score - sampling_logps)``
    is 1 up to numerics. Gradients flow when called outside ``torch.no_grad``.
    """
    if temperature is None:
        temperature = rollout.temperature
    if temperature <= 0:
        raise ValueError(f"scoring needs a temperature > 0, got {temperature}")
    with autocast(_model_device(model), enabled=bf16):
        return token_logps(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.completion_mask,
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
        )
