"""The rollout engine on the tiny random Llama: seeding, EOS, padding, filtering, scoring."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import InputError
from alignkit.rollout import (
    SamplingParams,
    draw,
    filter_logits,
    generate,
    sample_tokens,
    score,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def policy(tiny_model):
    from alignkit.models import load_policy

    return load_policy(tiny_model)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = ["This movie was", "I watched the film last night and it", "Why?"]
    return [tokenizer(t)["input_ids"] for t in texts]


def completion_tokens(rollout, row: int) -> list[int]:
    start = rollout.prompt_length
    length = int(rollout.completion_lengths[row])
    return rollout.input_ids[row, start : start + length].tolist()


def test_same_seed_same_tokens_different_seed_different(policy, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)
    first = generate(policy, tokenizer, prompts, params, num_samples=2, bf16=False)
    again = generate(policy, tokenizer, prompts, params, num_samples=2, bf16=False)
    other = generate(
        policy, tokenizer, prompts, SamplingParams(12, 1.0, seed=12), num_samples=2, bf16=False
    )
    assert torch.equal(first.input_ids, again.input_ids)
    assert first.completions == again.completions
    assert torch.equal(first.sampling_logps, again.sampling_logps)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_samples_of_a_prompt_are_contiguous(policy, tokenizer, prompts):
    rollout = generate(policy, tokenizer, prompts, SamplingParams(6, seed=1), 3, bf16=False)
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    prompt_part = rollout.input_ids[:, : rollout.prompt_length]
    for row in range(9):
        ids = prompt_part[row][rollout.attention_mask[row, : rollout.prompt_length].bool()]
        assert ids.tolist() == prompts[row // 3]
    # the three samples of a prompt differ (they draw different tokens)
    assert len({tuple(completion_tokens(rollout, r)) for r in range(3)}) == 3


def test_rows_stop_at_eos_and_leave_the_batch(policy, tokenizer, prompts):
    """Make a token the model samples early a stop token; check masks, padding, batch size."""
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    free = generate(policy, tokenizer, prompts, params, num_samples=2, bf16=False)
    stop = completion_tokens(free, 0)[2]  # row 0 draws this at step 2
    batch_sizes: list[int] = []

    def record(module, args, kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])

    original = policy.generation_config.eos_token_id
    policy.generation_config.eos_token_id = [stop]
    handle = policy.register_forward_pre_hook(record, with_kwargs=True)
    try:
        assert stop in stop_token_ids(policy, tokenizer)
        rollout = generate(policy, tokenizer, prompts, params, num_samples=2, bf16=False)
    finally:
        handle.remove()
        policy.generation_config.eos_token_id = original
    stops = set(stop_token_ids(policy, tokenizer)) | {stop}
    assert (
        bool(rollout.finished[0])
        and completion_tokens(rollout, 0)[:3] == completion_tokens(free, 0)[:3]
    )
    assert not bool(rollout.finished.all())
    width = rollout.input_ids.shape[1] - rollout.prompt_length
    assert width == 10  # the unfinished rows ran to max_new_tokens
    for row in range(rollout.num_rows):
        tokens = completion_tokens(rollout, row)
        length = len(tokens)
        first_stop = next((i for i, t in enumerate(tokens) if t in stops), None)
        if rollout.finished[row]:
            assert first_stop == length - 1  # ends at (and includes) its first EOS
        else:
            assert first_stop is None and length == width
        tail = slice(rollout.prompt_length + length, None)
        assert (rollout.input_ids[row, tail] == tokenizer.pad_token_id).all()
        assert rollout.attention_mask[row, tail].sum() == 0
        assert rollout.completion_mask[row, tail].sum() == 0
        assert rollout.completion_mask[row].sum() == length
        assert rollout.sampling_logps[row, tail].abs().sum() == 0
        in_completion = rollout.completion_mask[row].bool()
        assert (rollout.sampling_logps[row, in_completion] < 0).all()
    assert rollout.completion_mask[:, : rollout.prompt_length].sum() == 0
    assert rollout.completion_lengths.tolist() == rollout.completion_mask.sum(-1).tolist()
    # prefill runs each prompt once; finished rows are dropped from later steps
    assert batch_sizes[0] == len(prompts)
    assert batch_sizes[1] == rollout.num_rows
    assert batch_sizes[-1] < rollout.num_rows
    assert all(a >= b for a, b in zip(batch_sizes[1:], batch_sizes[2:], strict=False))


def test_left_padding_does_not_change_greedy_tokens(policy, tokenizer, prompts):
    short = prompts[2]  # the shortest prompt, padded when batched with the others
    params = SamplingParams(max_new_tokens=8, temperature=0.0, seed=0)
    alone = generate(policy, tokenizer, [short], params, bf16=False)
    batched = generate(policy, tokenizer, [prompts[1], short, prompts[0]], params, bf16=False)
    assert batched.prompt_length > alone.prompt_length
    assert completion_tokens(batched, 1) == completion_tokens(alone, 0)
    batched_logps = batched.sampling_logps[1][batched.completion_mask[1].bool()]
    alone_logps = alone.sampling_logps[0][alone.completion_mask[0].bool()]
    torch.testing.assert_close(batched_logps, alone_logps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_greedy_decoding_matches_transformers_generate(policy, tokenizer, prompts, bf16):
    """Same tokens and per-step log-probs as ``model.generate`` (its own cache and masks)."""
    from alignkit.models import autocast, bf16_supported

    if bf16 and not bf16_supported():
        pytest.skip("no bf16 on this CPU")
    rollout = generate(policy, tokenizer, prompts, SamplingParams(8, temperature=0.0), bf16=bf16)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = (
        torch.arange(width) >= width - torch.tensor([[len(p)] for p in prompts])
    ).long()
    with torch.no_grad(), autocast(enabled=bf16):
        out = policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(rollout.input_ids, out.sequences)
    logits = torch.stack(out.logits, dim=1).float()  # (B, 8, V)
    expected = torch.log_softmax(logits, -1).gather(-1, out.sequences[:, width:, None])[..., 0]
    # under bf16 the fast step's attention rounds its scores to bf16 where HF's SDPA
    # keeps them fp32: a log-prob of ~-10 then differs by a bf16 rounding or two
    atol = 1e-2 if bf16 else 1e-5
    torch.testing.assert_close(rollout.sampling_logps[:, width:], expected, atol=atol, rtol=0)


def test_top_k_one_and_tiny_top_p_equal_greedy(policy, tokenizer, prompts):
    greedy = generate(policy, tokenizer, prompts, SamplingParams(8, temperature=0.0), bf16=False)
    top_k = generate(
        policy, tokenizer, prompts, SamplingParams(8, 1.0, top_k=1, seed=9), bf16=False
    )
    top_p = generate(
        policy, tokenizer, prompts, SamplingParams(8, 1.0, top_p=1e-6, seed=9), bf16=False
    )
    assert torch.equal(greedy.input_ids, top_k.input_ids)
    assert torch.equal(greedy.input_ids, top_p.input_ids)
    # top-k sampling still records log-probs under the full (unfiltered) distribution
    torch.testing.assert_close(greedy.sampling_logps, top_k.sampling_logps)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 50)])
def test_score_matches_sampling_logps_fp32(policy, tokenizer, prompts, temperature, top_p, top_k):
    params = SamplingParams(16, temperature, top_p, top_k, seed=4)
    rollout = generate(policy, tokenizer, prompts, params, num_samples=2, bf16=False)
    with torch.no_grad():
        result = score(policy, rollout, with_entropy=True, bf16=False)
    mask = rollout.completion_mask.bool()
    ratio = torch.exp(result.logps - rollout.sampling_logps)[mask]
    assert (ratio - 1).abs().max() < 1e-4
    assert (result.logps[~mask] == 0).all()
    assert (result.entropy[mask] > 0).all()


def test_filter_logits_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    # nucleus: mass before each token 0, .5, .8, .95 -> top_p=0.7 keeps the first two
    assert kept(filter_logits(logits, top_k=0, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.85)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.01)) == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_k=0, top_p=0.7)) == [False, True, False, True]


def test_sample_frequencies_follow_the_tempered_filtered_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(1, temperature=1.0, top_k=2)
    tokens, logps = sample_tokens(logits, params, generator)
    frequency = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(frequency, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    assert math.isclose(float(logps[tokens == 0][0]), math.log(0.5), abs_tol=1e-6)
    # temperature 0.5 squares and renormalises the probabilities
    params = SamplingParams(1, temperature=0.5)
    tokens, logps = sample_tokens(logits, params, torch.Generator().manual_seed(1))
    tempered = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    tempered = tempered / tempered.sum()
    frequency = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(frequency, tempered, atol=0.015, rtol=0)
    assert math.isclose(float(logps[tokens == 1][0]), math.log(tempered[1]), abs_tol=1e-5)


@pytest.mark.parametrize("vocab", [512, 1000])  # whole blocks of 256, and a padded one
def test_unfiltered_sampling_draws_and_scores_as_the_softmax_would(vocab):
    """The unfiltered path draws from exp(logits - max) and takes log-probs from its sum."""
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(4)) * 4
    params = SamplingParams(1, temperature=0.7)
    tokens, logps = sample_tokens(logits, params, torch.Generator().manual_seed(9))
    log_softmax = torch.log_softmax(logits / 0.7, -1)
    assert torch.equal(tokens, draw(log_softmax.exp(), torch.Generator().manual_seed(9)))
    expected = log_softmax.gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    assert logps.max() < 0 and logps.min() < -2  # real log-probs, not all near 0


def test_draw_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [1e-12, 0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([draw(probs, generator) for _ in range(2000)])  # (2000, 3)
    assert set(draws[:, 0].tolist()) == {1, 3}
    assert set(draws[:, 1].tolist()) == {3}
    assert set(draws[:, 2].tolist()) <= {0, 2} and (draws[:, 2] == 2).float().mean() > 0.99
    assert abs((draws[:, 0] == 1).float().mean() - 0.5) < 0.04


def test_generate_restores_train_mode_and_frozen_flags(policy, tokenizer, prompts):
    policy.train()
    frozen = policy.get_output_embeddings().weight
    frozen.requires_grad_(False)
    try:
        generate(policy, tokenizer, prompts[:1], SamplingParams(3), bf16=True)
        assert policy.training
        assert not frozen.requires_grad
    finally:
        frozen.requires_grad_(True)
        policy.eval()


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("temperature", {"temperature": -1.0}),
        ("top_p", {"top_p": 0.0}),
        ("top_k", {"top_k": -2}),
    ],
)
def test_bad_sampling_params_name_the_field(policy, tokenizer, prompts, field, kwargs):
    params = SamplingParams(**{"max_new_tokens": 4, **kwargs})
    with pytest.raises(InputError) as err:
        generate(policy, tokenizer, prompts, params)
    assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.slow
def test_embedded_model_answers_a_chat_prompt_and_stops_at_eos():
    from alignkit.data.tokenize import encode_prompt
    from alignkit.models import EMBEDDED_MODEL, load_policy, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = load_policy(EMBEDDED_MODEL)
    prompt = encode_prompt(
        tokenizer, [{"role": "user", "content": "What is the capital of France?"}]
    )
    rollout = generate(model, tokenizer, [prompt], SamplingParams(48, temperature=0.0))
    reply = rollout.completions[0]
    assert bool(rollout.finished[0])
    last = rollout.input_ids[0, rollout.prompt_length + int(rollout.completion_lengths[0]) - 1]
    assert int(last) == tokenizer.eos_token_id
    words = reply.split()
    assert len(words) >= 3
    assert sum(ch.isascii() for ch in reply) / len(reply) > 0.95
    assert "Paris" in reply
