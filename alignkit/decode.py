"""The prefill and decode step of a Llama-family decoder, written out for the rollout loop.

:func:`alignkit.rollout.generate` calls the model once per new token. Through the
Hugging Face forward each call does much besides the arithmetic: it builds the 4-D
attention mask, dispatches through some thirty module calls per layer, runs seven
separate projections per layer and casts every activation around them. At batch 1
that overhead is a large share of a step.

:class:`FastDecoder` does the same arithmetic with less: q, k and v from one fused
product and gate and up from another (weights concatenated and, under bf16, packed
once for oneDNN, as :func:`alignkit.rollout._prepacked_linears` does for the plain
path), one rotary table and key mask per step shared by all layers, and attention
over the preallocated cache in place, the query heads sharing their key/value heads
(stacked as the rows of one product per key/value head in a decode step, SDPA's
``enable_gqa`` in the prefill) so no key or value is repeated. It runs the prefill too, into the
same cache layout as the plain path. Logits agree with the HF forward to float
rounding in fp32 and within bf16 tolerance under bf16 (``tests/test_decode.py``).

Only for the architectures whose decoder layer is exactly pre-norm RMSNorm ->
rotary attention -> RMSNorm -> SwiGLU MLP with plain ``nn.Linear`` projections
(Llama, Mistral without a sliding window in reach, Qwen2); :meth:`FastDecoder.build`
returns None for anything else (LoRA-wrapped layers too) and the plain path runs.

A model loaded for sampling only (:func:`alignkit.models.load_sampler`) gives its
decoder-layer weights to its decoder for good (:meth:`FastDecoder.take`): the packed
bf16 products are then the only copy, instead of the fp32 weights plus a packed copy,
and the model's own linears compute from them.

Under bf16 each layer's RoPE, cache write and attention of a decode step run as one
call of a small C kernel (:mod:`alignkit.native`, compiled on first use) where it
builds, and so do the residual adds, norms and silu(gate) x up between the products:
a generate call ~33% faster at batch 32 and ~32% at batch 1 here (docs/benchmarks.md).
Elsewhere the step does them in PyTorch.

Under bf16 the products' weights are held in one of two layouts at a time
(:meth:`FastDecoder.lay_out`): packed for oneDNN when a call samples several rows,
plain when it samples one. At one row a product does little but stream its weight
from memory, and torch's own bf16 matrix-vector kernel reads a plain weight faster
than oneDNN reads its packed one.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from alignkit import native
from alignkit.hugepages import back_with_huge_pages

# Architectures whose decoder layer is the one written out below.
_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# The decoder built for each frozen model, with the parameter versions it was built from.
_BUILT: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, FastDecoder]] = (
    weakref.WeakKeyDictionary()
)
# Sampling-only models whose linear weights live only in their decoder (FastDecoder.take).
_OWNED: weakref.WeakKeyDictionary[nn.Module, FastDecoder] = weakref.WeakKeyDictionary()

# One row attending over at most this many filled cache slots runs SDPA's kernel; over
# more, the two batched products in fp32. 2 threads, the embedded model, one layer's
# attention over 20 / 60 / 150 / 300 / 1000 slots: SDPA 24 / 48 / 97 / 238 / 582 us, the
# fp32 products 28 / 30 / 51 / 81 / 117 us (docs/benchmarks.md).
_ONE_ROW_SDPA_SLOTS = 32

# Reads the values of a model's tensors from its checkpoint (see FastDecoder.take).
Reader = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _own_values(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


class _Product:
    """The products of several linears with the same input, as one (outputs concatenated).

    Under bf16 the product is bf16 and its weight is packed for oneDNN (``weight``) or,
    for one-row products, plain (``plain``): one of the two (:meth:`lay_out`).
    """

    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], bf16: bool
    ) -> None:
        weight = (
            torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        )
        bias = None
        if any(b is not None for b in biases):
            parts = [
                b if b is not None else w.new_zeros(w.shape[0])
                for w, b in zip(weights, biases, strict=True)
            ]
            bias = torch.cat([b.detach() for b in parts])
        self.bf16 = bf16
        self.plain: torch.Tensor | None = None
        self.weight: torch.Tensor | None
        if bf16:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16))
            self.bias = None if bias is None else bias.to(torch.bfloat16)
        else:
            self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if not self.bf16:
            return F.linear(x, self.weight, self.bias)
        out = self.flat(x.to(torch.bfloat16).reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1])

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in) -> (n, out); ``x`` already in the product's dtype (bf16 under bf16)."""
        if self.weight is None:  # plain bf16 (one-row calls: _matrix_vector_kernel)
            return F.linear(x, self.plain, self.bias)
        if not self.bf16:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def lay_out(self, plain: bool) -> None:
        """Hold the bf16 weight plain (``plain``) or packed for oneDNN; the same values."""
        if not self.bf16 or plain == (self.plain is not None):
            return
        if plain:
            self.plain, self.weight = self.weight.to_dense(), None
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.plain)
            self.plain = None


@contextlib.contextmanager
def _matrix_vector_kernel(enabled: bool) -> Iterator[None]:
    """With ``enabled``, a bf16 ``F.linear`` of one row runs torch's matrix-vector kernel.

    Else it runs oneDNN's product from the plain weight, slower than both. oneDNN's
    matmul is switched off for the block (packed products, called by name, still run
    there); the switch is process-wide, so another thread's bf16 products in that time
    run torch's kernels too: the same results up to the order of their fp32 sums,
    slower at more than one row.
    """
    if not enabled:
        yield
        return
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def _group(modules: list[nn.Linear], bf16: bool, read: Reader, give: bool) -> _Product:
    """The fused product of linears sharing an input; with ``give``, the only copy of them.

    Given, each module's weight and bias are dropped (registered as None) and its
    forward returns its columns of the fused product.
    """
    tensors = [m.weight for m in modules] + [m.bias for m in modules if m.bias is not None]
    values = iter(read(tensors))
    weights = [next(values) for _ in modules]
    biases = [next(values) if m.bias is not None else None for m in modules]
    product = _Product(weights, biases, bf16)
    del tensors, values, weights, biases  # the source values go before the next group
    if give:
        start = 0
        for module in modules:
            end = start + module.out_features
            module.register_parameter("weight", None)
            module.register_parameter("bias", None)
            module.forward = functools.partial(_columns, product, start, end)
            start = end
    return product


def _columns(product: _Product, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
    out = product(x)
    return out if start == 0 and end == out.shape[-1] else out[..., start:end]


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor  # (H,)
    qkv: _Product  # (n, H) -> (n, (heads + 2 kv_heads) x head_dim)
    out: _Product  # (n, heads x head_dim) -> (n, H)
    post_norm: torch.Tensor  # (H,)
    gate_up: _Product  # (n, H) -> (n, 2 I)
    down: _Product  # (n, I) -> (n, H)


def _plain_linears(*modules: nn.Module) -> bool:
    return all(type(module) is nn.Linear for module in modules)


def _supported(model: nn.Module, capacity: int) -> bool:
    """``model``'s decoder layers are the ones :class:`FastDecoder` writes out."""
    config = getattr(model, "config", None)
    if type(model).__name__ not in _ARCHITECTURES or config is None:
        return False
    if getattr(config, "hidden_act", None) != "silu" or not hasattr(model, "model"):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < capacity:
        return False
    if not _plain_linears(model.lm_head):
        return False
    return all(
        _plain_linears(
            block.self_attn.q_proj,
            block.self_attn.k_proj,
            block.self_attn.v_proj,
            block.self_attn.o_proj,
            block.mlp.gate_proj,
            block.mlp.up_proj,
            block.mlp.down_proj,
        )
        for block in model.model.layers
    )


class FastDecoder:
    """The model's prefill and decode step, from weights fused (and packed) once."""

    # under bf16, the work between the products through alignkit.native where it builds
    native = True

    def __init__(
        self, model: nn.Module, bf16: bool, read: Reader | None = None, give: bool = False
    ) -> None:
        """Fuse (and under bf16 pack) the model's linears.

        ``read`` gives the values of the weights (default: the tensors themselves).
        ``give``: each group's weights leave the model once packed and its linears
        compute from the packed product (:meth:`take`); layer by layer, so at most one
        layer's source values are held beside the packed copies.
        """
        config = model.config
        backbone = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = backbone.embed_tokens
        self.rotary = backbone.rotary_emb
        self.final_norm = backbone.norm.weight
        read = read or _own_values
        # a head tied to the embedding stays with the model (the embedding needs it)
        tied = model.lm_head.weight is backbone.embed_tokens.weight
        self.lm_head = _group([model.lm_head], bf16, read, give and not tied)
        self.layers = []
        for block in backbone.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append(
                _Layer(
                    input_norm=block.input_layernorm.weight,
                    qkv=_group([attn.q_proj, attn.k_proj, attn.v_proj], bf16, read, give),
                    out=_group([attn.o_proj], bf16, read, give),
                    post_norm=block.post_attention_layernorm.weight,
                    gate_up=_group([mlp.gate_proj, mlp.up_proj], bf16, read, give),
                    down=_group([mlp.down_proj], bf16, read, give),
                )
            )

    @classmethod
    def take(cls, model: nn.Module, read: Reader | None = None) -> FastDecoder | None:
        """Pack a sampling-only model's decoder for good; its packed weights become the only copy.

        For a frozen model of a supported architecture on a CPU where oneDNN runs bf16
        (else None, and the model is left as it is). Each decoder-layer linear (and an
        untied LM head) gives up its weight and bias: it keeps its place in the model and
        its forward returns its slice of the packed fused product, so the Hugging Face
        forward still runs, in bf16 (q, k and v each compute the fused product there;
        :func:`alignkit.rollout.generate` uses the decoder itself). The model can no
        longer be trained, saved or run in fp32: memory is what it buys, one bf16 copy
        of those weights instead of the fp32 weights plus a packed copy.

        Once packed, the process's anonymous memory is moved onto huge pages
        (:func:`alignkit.hugepages.back_with_huge_pages`: ~1.3 s once for the embedded
        model, then 9-11% off a decode step at batch 1 and ~3% at batch 32).

        ``read``: where the weights' values come from, e.g. the checkpoint read apart
        from the model's own memory-mapped tensors (:func:`alignkit.models.load_sampler`),
        so that the fp32 file pages of one layer at a time are resident, not all of them.
        """
        if model in _OWNED:
            return _OWNED[model]
        parameters = list(model.parameters())
        if any(p.requires_grad for p in parameters) or not parameters:
            return None
        from alignkit.rollout import prepacking_supported  # (rollout imports this module)

        capacity = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        if not prepacking_supported(parameters[0].device) or not _supported(model, capacity):
            return None
        _BUILT.pop(model, None)
        with torch.no_grad():
            decoder = cls(model, bf16=True, read=read, give=True)
        # the packed weights stream from memory every step: on huge pages (3-11% faster)
        back_with_huge_pages()
        _OWNED[model] = decoder
        return decoder

    @staticmethod
    def owner(model: nn.Module) -> FastDecoder | None:
        """The decoder that holds ``model``'s linear weights (:meth:`take`), else None."""
        return _OWNED.get(model)

    @classmethod
    def build(cls, model: nn.Module, capacity: int, bf16: bool) -> FastDecoder | None:
        """The fast step for ``model``, or None when its layers are not the ones written here.

        ``capacity``: the longest sequence the rollout reaches (a sliding window shorter
        than it would change attention). ``bf16``: packed bf16 products (CPU with bf16)
        rather than fp32 ``F.linear``.

        A frozen model (no parameter requires grad: a sampler, an evaluator, a server)
        keeps the decoder built for it until one of its parameters changes (in place, as
        an optimizer or ``load_state_dict`` changes it, or replaced), so repeated calls
        pack its weights once. A trainable model gets a fresh one each call and keeps
        none between calls (its weights change every step; the packed copy would only
        hold memory).
        """
        owner = _OWNED.get(model)
        if owner is not None:
            if not bf16:
                raise ValueError("this model was loaded for bf16 sampling (load_sampler)")
            return owner
        if not _supported(model, capacity):
            return None
        parameters = list(model.parameters())
        if any(p.requires_grad for p in parameters):
            _BUILT.pop(model, None)
            return cls(model, bf16)
        key = (bf16, tuple((p.data_ptr(), p._version) for p in parameters))
        kept = _BUILT.get(model)
        if kept is not None and kept[0] == key:
            return kept[1]
        _BUILT.pop(model, None)  # the stale copy goes before the new one is packed
        decoder = cls(model, bf16)
        _BUILT[model] = (key, decoder)
        return decoder

    def lay_out(self, rows: int) -> None:
        """Hold the weights of every product as a call of ``rows`` rows computes fastest.

        One row: plain, for torch's bf16 matrix-vector kernel (the embedded model's
        products ~9 ms a step against ~14 ms packed, a whole step ~23 -> ~19 ms, 2
        threads; docs/benchmarks.md). More rows: packed for oneDNN (the decoder layers'
        products at 8 rows ~11 ms against ~19 ms from plain weights, at 32 ~24 against
        ~35). One layout at a time, so memory is that of one copy; a switch converts
        product by product (60-270 ms for the embedded model here), once per change of
        call shape. Under fp32 nothing changes.
        """
        plain = rows == 1
        for layer in self.layers:
            for product in (layer.qkv, layer.out, layer.gate_up, layer.down):
                product.lay_out(plain)
        self.lm_head.lay_out(plain)

    def _rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden.float(), (hidden.shape[-1],), weight.float(), self.eps)

    def _rotated(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(query, key, value), heads on dim -2, from fused products (..., (heads + 2 kv) x D).

        The rotary embedding is applied to query and key; ``cos`` and ``sin`` broadcast
        over their heads.
        """
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        split = (heads + kv_heads) * head_dim
        rotated = qkv[..., :split].unflatten(-1, (heads + kv_heads, head_dim))
        rotated = rotated * cos + _rotate_half(rotated) * sin
        query, key = rotated.split([heads, kv_heads], dim=-2)
        return query, key, qkv[..., split:].unflatten(-1, (kv_heads, head_dim))

    def _mlp(self, layer: _Layer, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(self._rms_norm(hidden, layer.post_norm)).chunk(2, dim=-1)
        return hidden + layer.down(F.silu(gate) * up)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms_norm(hidden, self.final_norm)).float()

    def prefill(
        self,
        input_ids: torch.Tensor,  # (B, P) left-padded prompts
        attention_mask: torch.Tensor,  # (B, P)
        cache: Cache,  # preallocated layers, empty or holding a prefix every row shares
    ) -> torch.Tensor:
        """Run the prompts into ``cache``; the logits after each one's last token (B, V) fp32.

        Slots already in ``cache`` (a shared prefix, :func:`alignkit.rollout._prefill`)
        come before the prompts: every row attends to them, its positions start after them.
        """
        batch, width = input_ids.shape
        past = cache.get_seq_length()
        positions = past + (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.embed(input_ids).float()  # (B, P, H)
        cos, sin = (t[:, :, None] for t in self.rotary(hidden, positions))  # (B, P, 1, D)
        device = input_ids.device
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # a query sees the real keys up to itself; a pad position sees itself too, so no
        # row of the mask is empty (an empty row would give NaN where nothing reads it)
        mask = causal & attention_mask.bool()[:, None, :]
        mask |= torch.eye(width, dtype=torch.bool, device=device)
        if past:  # and every query sees the prefix
            mask = torch.cat((mask.new_ones(batch, width, past), mask), dim=-1)
        mask = mask[:, None]  # (B, 1, P, past + P)
        kernels = native.library() if self.layers[0].qkv.bf16 and self.native else None
        if kernels is not None:
            return self._native_prefill(kernels, hidden, cos, sin, mask, cache)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            query, key, value = self._rotated(
                layer.qkv(self._rms_norm(hidden, layer.input_norm)), cos, sin
            )  # (B, P, heads or kv_heads, D)
            keys, values = kv.update(key.transpose(1, 2), value.transpose(1, 2))
            attended = F.scaled_dot_product_attention(
                query.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=True
            )  # (B, heads, P, D)
            hidden = hidden + layer.out(attended.transpose(1, 2).flatten(2))
            hidden = self._mlp(layer, hidden)
        return self._logits(hidden[:, -1])

    def _native_prefill(
        self,
        kernels,
        hidden: torch.Tensor,  # (B, P, H) fp32, the embedded prompts
        cos: torch.Tensor,  # (B, P, 1, D)
        sin: torch.Tensor,
        mask: torch.Tensor,  # (B, 1, P, past + P)
        cache: Cache,
    ) -> torch.Tensor:
        """:meth:`prefill` with its residual adds, norms and silu(gate) x up in native calls.

        (:func:`alignkit.native.add_rms_norm`, :func:`alignkit.native.silu_mul`; attention
        stays SDPA's.) The products' inputs are rounded to bf16 once, as the PyTorch
        prefill rounds them, and silu(gate) x up once where it rounds twice.
        """
        batch, width, size = hidden.shape
        flat = hidden.view(batch * width, size)
        normed = flat.new_empty(flat.shape, dtype=torch.bfloat16)
        activated = None
        native.add_rms_norm(
            kernels, flat, None, self.layers[0].input_norm.float(), normed, self.eps
        )
        for layer, kv, next_norm in zip(self.layers, cache.layers, self._next_norms(), strict=True):
            qkv = layer.qkv.flat(normed).view(batch, width, -1)
            query, key, value = self._rotated(qkv, cos, sin)  # (B, P, heads or kv_heads, D)
            keys, values = kv.update(key.transpose(1, 2), value.transpose(1, 2))
            attended = F.scaled_dot_product_attention(
                query.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=True
            )  # (B, heads, P, D)
            attended = attended.transpose(1, 2).reshape(batch * width, -1)
            activated = self._native_layer_end(
                kernels, layer, flat, attended, next_norm, normed, activated
            )
        last = normed.view(batch, width, size)[:, -1].contiguous()
        return self.lm_head.flat(last).float()

    def step(
        self,
        tokens: torch.Tensor,  # (n,) the token each row feeds
        positions: torch.Tensor,  # (n,) its position id
        cache: Cache,  # preallocated layers (alignkit.rollout._PreallocatedLayer)
        attention_mask: torch.Tensor,  # (n, L) 1 = attend; L = filled cache slots + 1
    ) -> torch.Tensor:
        """Write each layer's key and value for ``tokens`` into ``cache``; logits (n, V) fp32.

        At one token per row the step is mostly many small operations (batch 1) or the
        linears and attention over the cache (batch 32), so each layer runs few of them:
        the norms write the products' input dtype directly, the rotary embedding of query
        and key is one fused multiply-add into one buffer of the cache's dtype (reused by
        every layer), the key mask is built once per step, and attention is two batched
        products with the query heads of each key/value head stacked as the rows of one
        (no key or value repeated). At one query position SDPA's CPU kernel took 1.6 ms
        a layer at batch 32 over ~110 cached keys where the products take 0.27 ms
        (2 threads; docs/benchmarks.md). A single row runs the products in fp32 (its
        keys and values copied: a row's copies cost less than the bf16 kernels' fixed
        overhead), 1.6-5x faster than SDPA over 60-1000 slots, and no less exact (SDPA
        accumulates in fp32 too); over a short cache (at most ``_ONE_ROW_SDPA_SLOTS``
        filled slots) it keeps SDPA. A single row's products run torch's matrix-vector
        kernel when the weights are laid out plain (:meth:`lay_out`). Under bf16, where
        the native kernel builds, all of that attention is one call a layer instead
        (:meth:`_native_step`).
        """
        # every cast below is explicit; autocast (on around a bf16 rollout) would run the
        # one-row fp32 products in bf16
        plain = self.layers[0].qkv.plain is not None and tokens.shape[0] == 1
        with torch.autocast(tokens.device.type, enabled=False), _matrix_vector_kernel(plain):
            return self._step(tokens, positions, cache, attention_mask)

    def _step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        n = tokens.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        split = (heads + kv_heads) * head_dim
        dtype = cache.layers[0].key_buffer.dtype
        hidden = self.embed(tokens).float()  # (n, H) the residual stream stays fp32
        cos, sin = self.rotary(hidden, positions[:, None])  # (n, 1, D) each
        kernels = native.library() if dtype == torch.bfloat16 and self.native else None
        if kernels is not None:
            return self._native_step(kernels, hidden, cos, sin, cache, attention_mask)
        # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated)
        half = head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        # the batched products attend over each layer's whole buffer (zeros past the
        # filled slots): they read it in place, where the filled part's view would be copied
        filled = attention_mask.shape[1]
        for kv in cache.layers:
            kv.reserve(filled)
        sdpa = n == 1 and filled <= _ONE_ROW_SDPA_SLOTS
        one_row_fp32 = n == 1 and not sdpa  # the products, in fp32
        width = filled if sdpa else cache.layers[0].key_buffer.shape[2]
        # 0 where a row attends, -inf where it does not: (n, 1, 1, width) for SDPA (one
        # row; None when it attends every slot, as an unpadded prompt does: SDPA then
        # takes half the time), else (n x kv, 1, width), the rows of the batched products
        # (fp32 for one row's)
        mask = None
        if not sdpa or not bool(attention_mask.all()):
            mask_dtype = torch.float32 if one_row_fp32 else dtype
            mask = torch.full((n, width), float("-inf"), dtype=mask_dtype, device=hidden.device)
            mask[:, :filled].masked_fill_(attention_mask != 0, 0.0)
            mask = mask[:, None, None] if sdpa else mask.repeat_interleave(kv_heads, 0)[:, None]
        # buffers every layer reuses (each is read before the next layer writes it)
        rotated = hidden.new_empty((n, heads + kv_heads, head_dim), dtype=dtype)
        # the query heads of each key/value head as rows: (n, kv, heads / kv, D); (n, kv, D)
        query = rotated[:, :heads].view(n, kv_heads, heads // kv_heads, head_dim)
        key = rotated[:, heads:]
        scale = head_dim**-0.5
        normed = hidden.new_empty(hidden.shape, dtype=dtype)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            qkv = layer.qkv.flat(self._normed(hidden, layer.input_norm, normed))
            rotating = qkv.narrow(1, 0, split).view(n, heads + kv_heads, head_dim)
            torch.addcmul(rotating * cos, rotating.roll(half, -1), sin, out=rotated)
            kv.append(key, qkv.narrow(1, split, kv_heads * head_dim).view(n, kv_heads, head_dim))
            if sdpa:  # one row over a short cache: SDPA's kernel is faster
                attended = F.scaled_dot_product_attention(
                    query.view(1, heads, 1, head_dim), kv.keys, kv.values, attn_mask=mask,
                    enable_gqa=True,
                )  # fmt: skip
            else:
                # softmax(q k^T / sqrt(D) + mask) v as two batched products: at one query
                # position a row per head, which SDPA's kernel runs 4-6x slower at batch 8-32
                keys = kv.key_buffer.view(n * kv_heads, width, head_dim)
                values = kv.value_buffer.view(n * kv_heads, width, head_dim)
                rows = query.reshape(n * kv_heads, heads // kv_heads, head_dim)
                if one_row_fp32:
                    rows, keys, values = rows.float(), keys.float(), values.float()
                scores = torch.baddbmm(mask, rows, keys.transpose(1, 2), alpha=scale)
                # (the CPU kernel accumulates bf16 in fp32: the fp32 softmax, rounded once)
                probs = torch.softmax(scores, dim=-1)
                attended = torch.bmm(probs, values).to(dtype)  # (n x kv, heads / kv, D)
            hidden += layer.out.flat(attended.view(n, -1))
            gate_up = layer.gate_up.flat(self._normed(hidden, layer.post_norm, normed))
            inner = gate_up.shape[1] // 2
            gate, up = gate_up.narrow(1, 0, inner), gate_up.narrow(1, inner, inner)
            hidden += layer.down.flat(F.silu(gate).mul_(up))
        return self.lm_head.flat(self._normed(hidden, self.final_norm, normed)).float()

    def _native_step(
        self,
        kernels,
        hidden: torch.Tensor,  # (n, H) fp32, the embedded tokens
        cos: torch.Tensor,  # (n, 1, D)
        sin: torch.Tensor,
        cache: Cache,
        attention_mask: torch.Tensor,  # (n, L)
    ) -> torch.Tensor:
        """:meth:`_step` with the work between the products in native calls (:mod:`alignkit.native`).

        Per layer: one call for RoPE, the cache write and attention; one for each residual
        add and the RMSNorm after it (into the next product's bf16 input); one for
        silu(gate) x up. The same arithmetic, each result rounded to bf16 where the
        PyTorch step rounds it or fewer times: the attention scores and softmax stay in
        fp32 (the batched products round the scores to bf16), and silu(gate) x up is
        rounded once, not twice.
        """
        n = hidden.shape[0]
        slot = cache.layers[0].get_seq_length()
        if attention_mask.shape[1] != slot + 1:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} slots, not {slot + 1}"
            )
        keep = attention_mask.to(torch.bool).contiguous()
        cos, sin = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
        dtype = cache.layers[0].key_buffer.dtype
        attended = hidden.new_empty((n, self.heads * self.head_dim), dtype=dtype)
        normed = hidden.new_empty(hidden.shape, dtype=dtype)
        activated = None
        scale = self.head_dim**-0.5
        native.add_rms_norm(
            kernels, hidden, None, self.layers[0].input_norm.float(), normed, self.eps
        )
        for layer, kv, next_norm in zip(self.layers, cache.layers, self._next_norms(), strict=True):
            kv.reserve(slot + 1)
            qkv = layer.qkv.flat(normed)
            native.decode_attention(
                kernels, qkv, cos, sin, kv.key_buffer, kv.value_buffer, keep, attended,
                self.heads, slot, scale,
            )  # fmt: skip
            kv.appended()
            activated = self._native_layer_end(
                kernels, layer, hidden, attended, next_norm, normed, activated
            )
        return self.lm_head.flat(normed).float()

    def _next_norms(self) -> list[torch.Tensor]:
        """The norm after each layer: the next one's input norm, after the last the final norm."""
        return [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]

    def _native_layer_end(
        self,
        kernels,
        layer: _Layer,
        hidden: torch.Tensor,  # (rows, H) fp32, the residual stream: updated in place
        attended: torch.Tensor,  # (rows, heads x D) bf16, the attention's output
        next_norm: torch.Tensor,  # the next layer's input norm, or the final one
        normed: torch.Tensor,  # (rows, H) bf16: the next product's input, written
        activated: torch.Tensor | None,  # (rows, I) bf16 buffer for silu(gate) x up
    ) -> torch.Tensor:
        """A layer after its attention, the adds and norms in native calls; the MLP's buffer."""
        out = layer.out.flat(attended)
        native.add_rms_norm(kernels, hidden, out, layer.post_norm.float(), normed, self.eps)
        gate_up = layer.gate_up.flat(normed)
        if activated is None:
            activated = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
        native.silu_mul(kernels, gate_up, activated)
        down = layer.down.flat(activated)
        native.add_rms_norm(kernels, hidden, down, next_norm.float(), normed, self.eps)
        return activated

    def _normed(self, hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor):
        """RMSNorm of the fp32 ``hidden`` (n, H), computed in fp32, written into ``out``."""
        return out.copy_(F.rms_norm(hidden, (hidden.shape[-1],), weight.float(), self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)
