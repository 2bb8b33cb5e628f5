"""The fast decode step against the Hugging Face forward it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit import decode, native
from alignkit.decode import FastDecoder
from alignkit.models import autocast, load_policy, load_sampler, load_tokenizer
from alignkit.rollout import (
    _GROWTH,
    SamplingParams,
    _new_cache,
    _PreallocatedLayer,
    _prefill_logits,
    generate,
)


def _decode_both(
    model,
    bf16: bool,
    steps: int = 6,
    rows: int = 2,
    padded: bool = False,
    laid_out_for: int | None = None,
):
    """Prefill two left-padded prompts, then feed the same tokens through both steps.

    Returns the per-step logits of the HF forward and of the fast step, (steps, rows, V)
    each; ``rows=1`` keeps the first prompt only (the step's one-row attention, no slot
    masked), with ``padded`` the second one only (one row with masked slots). The
    decoder's weights are laid out for a call of ``laid_out_for`` rows (default
    ``rows``, as ``generate`` does; 2 with ``rows=1``: one row left of a larger batch).
    """
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 3000, (2, 9), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0  # the second prompt is 5 tokens, left-padded
    feed = torch.randint(5, 3000, (steps, 2), generator=generator)
    kept = slice(1, 2) if padded else slice(0, rows)
    input_ids, mask, feed = input_ids[kept], mask[kept], feed[:, kept]
    capacity = input_ids.shape[1] + steps
    decoder = FastDecoder.build(model, capacity, bf16=bf16)
    assert decoder is not None
    decoder.lay_out(rows if laid_out_for is None else laid_out_for)
    with torch.no_grad(), autocast(enabled=bf16):
        plain_cache = _new_cache(model, capacity)
        _prefill_logits(model, input_ids, mask, plain_cache)
        fast_cache = copy.deepcopy(plain_cache)
        attention = torch.cat([mask, torch.ones(rows, steps, dtype=torch.long)], dim=1)
        first = mask.sum(-1)
        plain, fast = [], []
        for step in range(steps):
            column = input_ids.shape[1] + step + 1
            positions = first + step
            out = model(
                input_ids=feed[step][:, None],
                attention_mask=attention[:, :column],
                position_ids=positions[:, None],
                past_key_values=plain_cache,
                use_cache=True,
            )
            plain.append(out.logits[:, -1].float())
            fast.append(decoder.step(feed[step], positions, fast_cache, attention[:, :column]))
        for plain_layer, fast_layer in zip(plain_cache.layers, fast_cache.layers, strict=True):
            assert fast_layer.length == plain_layer.length == capacity
    return torch.stack(plain), torch.stack(fast)


# one_row_sdpa_slots 0: a single row attends through the fp32 products over the whole
# buffer (as over a long cache), 96: through SDPA (these caches are all shorter), 24:
# SDPA, then the products once the cache holds 25 slots
@pytest.mark.parametrize(
    ("rows", "steps", "padded", "one_row_sdpa_slots"),
    [
        (1, 6, False, 96),
        (1, 6, True, 96),
        (1, 40, True, 96),
        (1, 6, False, 0),
        (1, 6, True, 0),
        (1, 40, True, 0),
        (1, 40, False, 24),
        (2, 6, False, 96),
        (2, 40, False, 96),
    ],
)
def test_fast_step_gives_the_hf_logits_in_fp32(
    tiny_model, monkeypatch, rows, steps, padded, one_row_sdpa_slots
):
    """40 steps: the cache's buffers grow while the step attends over them whole."""
    monkeypatch.setattr(decode, "_ONE_ROW_SDPA_SLOTS", one_row_sdpa_slots)
    model = load_policy(tiny_model).eval()
    plain, fast = _decode_both(model, bf16=False, steps=steps, rows=rows, padded=padded)
    assert plain.abs().max() > 0.1  # real logits, not zeros
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-5)


# laid_out_for 2 with one row: packed products (one row left of a larger call)
@pytest.mark.parametrize(
    ("rows", "one_row_sdpa_slots", "laid_out_for"),
    [(1, 96, None), (1, 0, None), (2, 96, None), (1, 96, 2), (1, 0, 2)],
)
def test_fast_step_is_within_bf16_tolerance_of_autocast(
    tiny_model, monkeypatch, rows, one_row_sdpa_slots, laid_out_for
):
    monkeypatch.setattr(decode, "_ONE_ROW_SDPA_SLOTS", one_row_sdpa_slots)
    model = load_policy(tiny_model).eval()
    plain, fast = _decode_both(model, bf16=True, rows=rows, laid_out_for=laid_out_for)
    scale = plain.abs().max()
    # bf16 keeps 8 bits of mantissa: products summed in another order differ by a few ulps
    assert (fast - plain).abs().max() <= 2e-2 * scale
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


# bf16 with native: the residual adds, norms and silu x up in native calls
@pytest.mark.parametrize(("bf16", "native_kernels"), [(False, False), (True, False), (True, True)])
def test_fast_prefill_gives_the_hf_logits_and_cache(tiny_model, monkeypatch, bf16, native_kernels):
    monkeypatch.setattr(FastDecoder, "native", native_kernels)
    calls = []
    norm = native.add_rms_norm
    monkeypatch.setattr(native, "add_rms_norm", lambda *a: calls.append(1) or norm(*a))
    model = load_policy(tiny_model).eval()
    input_ids = torch.randint(5, 3000, (3, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    mask[2, :11] = 0  # a one-token prompt
    decoder = FastDecoder.build(model, 12, bf16=bf16)
    with torch.no_grad(), autocast(enabled=bf16):
        plain_cache, fast_cache = _new_cache(model, 12), _new_cache(model, 12)
        plain = _prefill_logits(model, input_ids, mask, plain_cache)
        fast = decoder.prefill(input_ids, mask, fast_cache)
    # one norm before the layers, then two a layer
    assert len(calls) == (1 + 2 * model.config.num_hidden_layers if native_kernels else 0)
    tolerance = 2e-2 * plain.abs().max() if bf16 else 1e-5
    assert (fast - plain).abs().max() <= tolerance
    real = mask.bool()[:, None, :, None]  # (B, 1, P, 1): pad slots are never read
    for plain_layer, fast_layer in zip(plain_cache.layers, fast_cache.layers, strict=True):
        assert fast_layer.length == 12
        pairs = ((fast_layer.keys, plain_layer.keys), (fast_layer.values, plain_layer.values))
        for mine, theirs in pairs:
            assert torch.isfinite(mine).all()
            gap = ((mine.float() - theirs.float()) * real).abs().max()
            assert gap <= (2e-2 * theirs.float().abs().max() if bf16 else 1e-5)


def _assert_same_samples(fast, plain) -> None:
    """The same tokens, EOS stops and log-probs row by row, up to a rounding flip.

    The two steps' fp32 logits differ by float rounding, so a uniform that lands within
    that of a token's CDF boundary draws the neighbouring token id in one and not the
    other. Such a row must agree up to the flip and flip to an adjacent id (a real
    error draws an unrelated token); at most one row of a test may flip. Rows draw from
    their own streams (``first_row``), so a flip leaves the other rows' draws alone.
    """
    flips = 0
    for row in range(plain.num_rows):
        differ = (fast.input_ids[row] != plain.input_ids[row]).nonzero()
        stop = differ[0].item() if len(differ) else plain.input_ids.shape[1]
        before = slice(0, stop)
        assert torch.allclose(
            fast.sampling_logps[row, before], plain.sampling_logps[row, before], atol=1e-5
        )
        if len(differ) == 0:
            assert fast.completion_lengths[row] == plain.completion_lengths[row]
            continue
        flips += 1
        assert abs(int(fast.input_ids[row, stop]) - int(plain.input_ids[row, stop])) == 1, row
    assert flips <= 1


def test_cache_buffers_grow_with_zeros_up_to_the_capacity():
    layer = _PreallocatedLayer(capacity=45)
    states = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4) + 1
    keys, values = layer.update(states, -states)
    assert layer.key_buffer.shape == (2, 3, 10 + _GROWTH, 4)
    assert torch.equal(keys, states) and torch.equal(values, -states)
    assert not layer.key_buffer[:, :, 10:].any() and not layer.value_buffer[:, :, 10:].any()
    for _ in range(_GROWTH):
        layer.append(states[:, :, 0], -states[:, :, 0])
    assert layer.key_buffer.shape[2] == layer.length == 10 + _GROWTH  # full, not grown
    layer.append(states[:, :, 1], -states[:, :, 1])
    # the slot after the last one held grew the buffers, to the capacity at most
    assert layer.length == 11 + _GROWTH and layer.key_buffer.shape[2] == 45
    assert torch.equal(layer.keys[:, :, :10], states)
    assert torch.equal(layer.values[:, :, 10 + _GROWTH], -states[:, :, 1])
    assert not layer.key_buffer[:, :, layer.length :].any()
    for _ in range(45 - layer.length):
        layer.append(states[:, :, 0], -states[:, :, 0])
    with pytest.raises(RuntimeError, match="overflow: 46 > capacity 45"):
        layer.append(states[:, :, 0], -states[:, :, 0])


def test_generate_samples_the_same_tokens_with_either_step_in_fp32(tiny_model):
    model = load_policy(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    generator = torch.Generator().manual_seed(5)
    # prompts of unlike length (bucketed prefill), 3 samples each; a common token as EOS
    # would stop rows early, so compaction is exercised by the low max length of some rows
    prompts = [torch.randint(5, 3000, (n,), generator=generator).tolist() for n in (11, 4, 30)]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=2)
    args = (model, tokenizer, prompts, params, 3)
    plain = generate(*args, bf16=False, fast_decode=False, first_row=0)
    fast = generate(*args, bf16=False, fast_decode=True, first_row=0)
    _assert_same_samples(fast, plain)
    assert plain.completion_lengths.sum() >= 3 * 3 * 4  # tokens were sampled


def test_rows_that_stop_early_are_dropped_the_same_way(tiny_model):
    """An EOS that the tiny model samples often: rows finish at different steps."""
    model = load_policy(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    prompts = [[17, 300, 2051], [9, 9, 400, 41, 7]]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11)
    # the tokens the model samples most at the first step become "EOS" for this test
    args = (model, tokenizer, prompts, params, 4)
    probe = generate(*args, bf16=False, fast_decode=False, first_row=0)
    sampled = probe.input_ids[probe.completion_mask.bool()]
    common = torch.mode(sampled).values.item()
    model.generation_config.eos_token_id = [common]
    plain = generate(*args, bf16=False, fast_decode=False, first_row=0)
    fast = generate(*args, bf16=False, fast_decode=True, first_row=0)
    lengths = plain.completion_lengths
    assert lengths.min() < lengths.max()  # rows stopped at different steps
    _assert_same_samples(fast, plain)


def test_other_architectures_and_lora_keep_the_hf_forward(tiny_model):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    assert FastDecoder.build(gpt2, 64, bf16=False) is None
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        load_policy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    assert FastDecoder.build(lora, 64, bf16=False) is None
    assert FastDecoder.build(lora.base_model.model, 64, bf16=False) is None  # lora layers inside
    assert FastDecoder.build(load_policy(tiny_model), 64, bf16=False) is not None


@pytest.mark.parametrize(
    ("rows", "laid_out_for", "native"),
    [(2, None, True), (2, None, False), (1, None, True), (1, None, False), (1, 2, False)],
)
def test_embedded_model_fast_step_within_bf16_of_the_hf_step(
    monkeypatch, rows, laid_out_for, native
):
    """On the real model: the fast step's bf16 logits are about as close to fp32 as autocast's.

    In PyTorch (``native`` False) its attention scores are bf16 products (as
    transformers' eager attention computes them), SDPA's accumulate in fp32: the errors
    measured 0.46 max / 0.088 mean against autocast's 0.42 / 0.081 on logits up to ~34.
    One row attends through its fp32 products there (as over a long cache): 0.28 / 0.050
    against autocast's 0.31 / 0.072; when the rollout's autocast ran those products in
    bf16 they erred by 0.42 / 0.101, past the mean's bound. The native kernel keeps the
    scores in fp32 (32 rows, 30 steps: 0.70 / 0.068 against autocast's 0.67 / 0.069).
    """
    monkeypatch.setattr(decode, "_ONE_ROW_SDPA_SLOTS", 0)
    monkeypatch.setattr(FastDecoder, "native", native)
    model = load_policy("smollm2-135m-instruct").eval()
    plain, fast = _decode_both(model, bf16=True, rows=rows, laid_out_for=laid_out_for)
    exact, _ = _decode_both(model, bf16=False, rows=rows)
    bf16_error = (plain - exact).abs()
    assert bf16_error.max() > 0  # bf16 really ran
    fast_error = (fast - exact).abs()
    assert fast_error.max() <= 1.5 * bf16_error.max()
    assert fast_error.mean() <= 1.25 * bf16_error.mean()
    # the same greedy token wherever fp32's top two are well apart (4 mean bf16 errors)
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 4 * bf16_error.mean()
    assert clear.sum() >= clear.numel() // 2
    assert torch.equal(fast.argmax(-1)[clear], exact.argmax(-1)[clear])


@pytest.mark.parametrize("rows", [1, 2])
def test_bf16_step_attends_through_the_native_kernel(tiny_model, monkeypatch, rows):
    """Once per layer and step, within bf16 of the PyTorch step and of autocast."""
    calls = []
    kernel = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[-2]) or kernel(*a))
    model = load_policy(tiny_model).eval()
    plain, fast = _decode_both(model, bf16=True, rows=rows, steps=6)
    layers = model.config.num_hidden_layers
    prompt = 9  # _decode_both's prompts: each step writes the slot after the last
    assert calls == [prompt + step for step in range(6) for _ in range(layers)]
    monkeypatch.setattr(FastDecoder, "native", False)
    _, torch_step = _decode_both(model, bf16=True, rows=rows, steps=6)
    scale = plain.abs().max()
    assert (fast - torch_step).abs().max() <= 2e-2 * scale
    assert (fast - plain).abs().max() <= 2e-2 * scale
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


def test_native_step_refuses_a_mask_of_the_wrong_width(tiny_model):
    model = load_policy(tiny_model).eval()
    decoder = FastDecoder.build(model, 16, bf16=True)
    with torch.no_grad(), autocast(enabled=True):
        cache = _new_cache(model, 16)
        ids = torch.randint(5, 3000, (2, 4))
        _prefill_logits(model, ids, torch.ones_like(ids), cache)
        with pytest.raises(ValueError, match="covers 4 slots, not 5"):
            decoder.step(ids[:, 0], torch.tensor([4, 4]), cache, torch.ones(2, 4))


def test_one_row_calls_lay_the_weights_out_plain_and_several_rows_packed(tiny_model, monkeypatch):
    """Under bf16 the products' weights are held in one layout at a time, same values.

    Laid out for one row they are plain bf16 tensors (torch's matrix-vector kernel) equal
    to the model's weights, and a one-row product gives what the packed one gives up to
    the order of its fp32 sums (a bf16 ulp of the output); laid out for several rows they
    are oneDNN's packed tensors again. oneDNN's matmul is switched off only inside a
    one-row step from plain weights.
    """
    model = load_policy(tiny_model).eval().requires_grad_(False)
    decoder = FastDecoder.build(model, 32, bf16=True)
    layer, source = decoder.layers[0], model.model.layers[0].self_attn
    x = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    x = x.to(torch.bfloat16)
    packed = layer.qkv.flat(x)
    assert layer.qkv.plain is None and layer.qkv.weight.is_mkldnn

    decoder.lay_out(1)
    fused = torch.cat([source.q_proj.weight, source.k_proj.weight, source.v_proj.weight])
    assert layer.qkv.weight is None and not layer.qkv.plain.is_mkldnn
    assert torch.equal(layer.qkv.plain, fused.to(torch.bfloat16))
    products = [p for block in decoder.layers for p in (block.qkv, block.out, block.gate_up)]
    assert all(p.weight is None for p in [*products, decoder.layers[-1].down, decoder.lm_head])
    with decode._matrix_vector_kernel(True):
        assert not torch.backends.mkldnn.enabled
        one_row = layer.qkv.flat(x)
    assert torch.backends.mkldnn.enabled
    assert packed.abs().max() > 0.1
    ulp = packed.float().abs().clamp(min=1e-3) * 2**-7
    assert ((one_row.float() - packed.float()).abs() <= ulp).all()

    seen = []  # oneDNN's matmul switch, as the products of each step see it
    real_flat = decode._Product.flat

    def flat(product, x):
        seen.append(torch.backends.mkldnn.enabled)
        return real_flat(product, x)

    monkeypatch.setattr(decode._Product, "flat", flat)
    cache = _new_cache(model, 16)
    ids = torch.randint(5, 3000, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        decoder.prefill(ids, torch.ones_like(ids), cache)
        seen.clear()
        decoder.step(ids[:, -1], torch.tensor([6]), cache, torch.ones(1, 7))
        assert seen and not any(seen)  # every product of the step, oneDNN off
        decoder.lay_out(3)
        seen.clear()
        decoder.step(ids[:, -1], torch.tensor([7]), cache, torch.ones(1, 8))
        assert seen and all(seen)  # packed: left on
    monkeypatch.undo()
    assert torch.backends.mkldnn.enabled
    assert layer.qkv.plain is None and layer.qkv.weight.is_mkldnn
    assert torch.equal(layer.qkv.flat(x), packed)  # packed again: the same product


def test_a_frozen_model_packs_once_until_its_weights_change(tiny_model):
    model = load_policy(tiny_model).eval().requires_grad_(False)
    first = FastDecoder.build(model, 32, bf16=False)
    assert FastDecoder.build(model, 32, bf16=False) is first  # no repacking
    assert FastDecoder.build(model, 32, bf16=True) is not first  # another precision
    bf16 = FastDecoder.build(model, 32, bf16=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # as an optimizer step would
    changed = FastDecoder.build(model, 32, bf16=True)
    assert changed is not bf16
    # the rebuilt decoder computes with the new weight: its logits match the HF forward's
    plain, fast = _decode_both(model, bf16=False)
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-5)
    trainable = load_policy(tiny_model)
    assert FastDecoder.build(trainable, 32, bf16=False) is not FastDecoder.build(
        trainable, 32, bf16=False
    )  # a policy being trained is repacked every call


def _sampling_prompts():
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(5, 3000, (n,), generator=generator).tolist() for n in (11, 4, 30)]


@pytest.mark.parametrize("new_tokens", [16, 4])
def test_sampler_model_samples_what_the_frozen_fp32_model_samples(tiny_model, new_tokens):
    """load_sampler's model (weights only in the packed decoder) against load_policy's, frozen.

    At 4 new tokens the fp32 model would skip packing; the sampler always decodes through
    its decoder, so the fp32 model is asked for the fast step to compare like with like.
    """
    tokenizer = load_tokenizer(tiny_model)
    frozen = load_policy(tiny_model).requires_grad_(False)
    sampler = load_sampler(tiny_model)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=2)
    plain = generate(frozen, tokenizer, _sampling_prompts(), params, 3, fast_decode=True)
    mine = generate(sampler, tokenizer, _sampling_prompts(), params, 3)
    assert torch.equal(mine.input_ids, plain.input_ids)
    assert torch.equal(mine.completion_mask, plain.completion_mask)
    assert torch.allclose(mine.sampling_logps, plain.sampling_logps, atol=1e-5)
    assert plain.completion_lengths.sum() >= 3 * 3 * min(new_tokens, 4)
    assert plain.sampling_logps.abs().sum() > 0


def test_sampler_model_holds_its_linear_weights_once_and_still_runs_the_hf_forward(tiny_model):
    frozen = load_policy(tiny_model).requires_grad_(False)
    sampler = load_sampler(tiny_model)
    assert FastDecoder.owner(sampler) is not None
    kept = {n for n, _ in sampler.named_parameters()}
    assert kept == {n for n, _ in frozen.named_parameters() if "proj" not in n}  # norms, embedding
    assert all(p.dtype == torch.float32 for p in sampler.parameters())
    ids = torch.randint(5, 3000, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), autocast(enabled=True):
        theirs = frozen(input_ids=ids).logits.float()
        mine = sampler(input_ids=ids).logits.float()  # q, k, v and gate, up from fused products
    assert (mine - theirs).abs().max() <= 2e-2 * theirs.abs().max()
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
    tokenizer = load_tokenizer(tiny_model)
    with pytest.raises(ValueError, match="bf16"):
        generate(sampler, tokenizer, [[5, 6]], SamplingParams(max_new_tokens=2), bf16=False)


def test_checkpoint_reader_reads_the_loaded_values_apart_from_the_model(tiny_model):
    from alignkit.models import _checkpoint_reader, resolve_model

    model = load_policy(tiny_model).requires_grad_(False)
    read = _checkpoint_reader(model, resolve_model(tiny_model))
    weight = model.model.layers[1].mlp.down_proj.weight
    (value,) = read([weight])
    assert value is not weight and value.data_ptr() != weight.data_ptr()
    assert torch.equal(value, weight)
    with torch.no_grad():
        weight.mul_(2.0)  # changed since loading: read in place
    (value,) = read([weight])
    assert value is weight
