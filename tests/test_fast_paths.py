"""Every fast path gives the numbers of the plain one.

- prompts shared between rows (DPO pairs, k samples of a prompt) are packed into one
  sequence: same log-probs, entropies and gradients as the plain batch (fp32);
- bf16 weights with fp32 masters: same DPO losses as autocast alone within bf16
  tolerance, masters untouched and gradients fp32; the same for the online update
  (GRPO's loss on one rollout, with the fused layers);
- the fused AdamW step: the same update as the per-tensor loop;
- reference scoring grouped by prompt: the same sums as one row at a time;
- sampling with linears run from pre-packed bf16 weights: the same tokens and
  log-probs as autocast's linears, and the model's own linears back afterwards;
- prompts prefilled in groups of like length: the groups worked by hand, and the
  same tokens (fp32) and last logits and cache (bf16 tolerance) as one padded batch;
- a prefix all prompts share prefilled once: its length worked by hand, and the same
  tokens (fp32, either decode step) and last logits and cache (bf16) as without it;
- the CLI's runtime environment: the allocator is preloaded once, and can be turned off.
"""

from __future__ import annotations

import contextlib
import csv
import os

import pytest
import torch

from alignkit import cli, logprobs, rollout
from alignkit.config import load_config
from alignkit.data import collate_pairs
from alignkit.data.tokenize import TokenizedPair
from alignkit.logprobs import token_logps
from alignkit.losses.policy import grpo_loss
from alignkit.models import autocast, bf16_compute, load_policy, load_tokenizer
from alignkit.recipes import dpo
from alignkit.recipes.dpo import make_pairwise_loss
from alignkit.recipes.policy_gradient import forward_pass
from alignkit.reference import score_sequences
from alignkit.rollout import (
    SamplingParams,
    generate,
    length_buckets,
    prepacking_supported,
    shared_prefix_length,
)
from alignkit.training import loop
from alignkit.training.fused import fused_layers
from alignkit.training.loop import use_fused_adam
from alignkit.training.optim import build_optimizer


def _pairs(seed: int = 0) -> list[TokenizedPair]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 3000, (n,), generator=generator).tolist()

    return [
        TokenizedPair(ids(30), ids(9), ids(4), None),
        TokenizedPair(ids(22), ids(3), ids(12), None),
        TokenizedPair(ids(41), ids(7), ids(7), None),
    ]


@contextlib.contextmanager
def _no_packing(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(logprobs, "_PACKING_GAIN", 0.0)
        yield


@pytest.fixture
def always_pack(monkeypatch):
    """The flat layout whatever its estimated cost (the tiny model is all overhead)."""
    monkeypatch.setattr(logprobs, "_PACKING_GAIN", float("inf"))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pairs_share_their_prompt_with_identical_logps_and_grads(
    tiny_model, attention, always_pack
):
    model = load_policy(tiny_model)
    model.config._attn_implementation = attention
    batch = collate_pairs(_pairs(), pad_id=0)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    scored = batch["completion_mask"].bool().clone()
    scored[:, 0] = False
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    packing = logprobs._pack_shared_prompts(model.model, args[0], args[1], scored, positions)
    assert packing is not None and packing.groups == 3  # one prompt per pair
    assert packing.input_ids.numel() < batch["input_ids"].numel()

    fast = token_logps(model, *args, with_entropy=True)
    fast.logps.sum().backward()
    fast_grads = _grads(model)
    model.zero_grad()
    with _no_packing(pytest.MonkeyPatch()):
        plain = token_logps(model, *args, with_entropy=True)
    plain.logps.sum().backward()
    assert torch.allclose(fast.logps, plain.logps, atol=1e-5)
    assert torch.allclose(fast.entropy, plain.entropy, atol=1e-5)
    for name, grad in _grads(model).items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt", [0, 5])
def test_scored_attention_gives_sdpas_outputs_and_gradients(dtype, prompt):
    """9 query heads over 3 key/value heads; queries see the prompt, then themselves causally."""
    generator = torch.Generator().manual_seed(3)
    n, keys, dim = 7, prompt + 7, 16

    def leaf(*shape):
        return torch.randn(shape, generator=generator).to(dtype).requires_grad_()

    query, key, value = leaf(1, 9, n, dim), leaf(1, 3, keys, dim), leaf(1, 3, keys, dim)
    grad_out = torch.randn((1, 9, n, dim), generator=generator).to(dtype)
    bias = logprobs._scores_bias(n, keys, 3, dtype, query.device)
    assert bias.shape == (3 * n, keys)
    assert (bias[:n].isinf().sum(-1) == torch.arange(n - 1, -1, -1)).all()  # row i hides n-1-i
    out = logprobs._ScoredAttention.apply(query, key, value, bias, dim**-0.5)
    grads = torch.autograd.grad(out, (query, key, value), grad_out)
    seen = torch.ones((n, keys), dtype=torch.bool).tril(prompt)
    inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    ref = torch.nn.functional.scaled_dot_product_attention(*inputs, attn_mask=seen, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out.double())
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    assert torch.allclose(out.double(), ref, atol=tolerance, rtol=tolerance)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        assert torch.allclose(mine.double(), theirs, atol=tolerance, rtol=tolerance)


def test_long_calls_run_flash_with_the_same_results(tiny_model, always_pack, monkeypatch):
    model = load_policy(tiny_model)
    batch = collate_pairs(_pairs(), pad_id=0)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    scored = token_logps(model, *args).logps
    monkeypatch.setattr(logprobs, "_SCORED_KEYS", 0)  # every call is "long"
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(k["is_causal"]) or sdpa(*a, **k),
    )
    flash = token_logps(model, *args).logps
    layers = model.config.num_hidden_layers
    assert calls == [True, False] * 3 * layers  # per pair: chosen causal, rejected masked
    assert torch.allclose(scored, flash, atol=1e-5)


def test_samples_of_a_left_padded_prompt_share_it(tiny_model, always_pack):
    """Rollout layout: left-padded prompts, k samples each, completions padded after EOS."""
    model = load_policy(tiny_model)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 3000, (n,), generator=generator) for n in (11, 6)]
    k, width, new = 3, 11, 8
    input_ids = torch.zeros((2 * k, width + new), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row in range(2 * k):
        prompt = prompts[row // k]
        length = new - row  # ragged completions
        input_ids[row, width - len(prompt) : width] = prompt
        input_ids[row, width : width + length] = torch.randint(5, 3000, (length,))
        attention_mask[row, width - len(prompt) : width + length] = 1
        completion_mask[row, width : width + length] = 1
    args = (input_ids, attention_mask, completion_mask)
    scored = completion_mask.bool()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    packing = logprobs._pack_shared_prompts(
        model.model, input_ids, attention_mask, scored, positions
    )
    assert packing.groups == 2 and packing.input_ids.shape == (1, 11 + 6 + sum(range(3, 9)))
    fast = token_logps(model, *args, temperature=0.7, with_entropy=True)
    with _no_packing(pytest.MonkeyPatch()):
        plain = token_logps(model, *args, temperature=0.7, with_entropy=True)
    assert torch.allclose(fast.logps, plain.logps, atol=1e-5)
    assert torch.allclose(fast.entropy, plain.entropy, atol=1e-5)
    assert (fast.logps[completion_mask == 0] == 0).all()


def test_flat_layout_is_chosen_where_it_saves_work():
    """The cost model on the embedded model's shape: HH-like pairs pack, one bare row not."""
    from types import SimpleNamespace

    backbone = torch.nn.Module()
    backbone.config = SimpleNamespace(
        _attn_implementation="sdpa", hidden_size=576, intermediate_size=1536, model_type="llama"
    )
    pairs = [
        TokenizedPair(list(range(5, 5 + n)), [7] * c, [8] * r, None)
        for n, c, r in [(180, 60, 90), (40, 120, 30), (300, 20, 25), (90, 90, 90)]
    ]
    batch = collate_pairs(pairs, pad_id=0)
    scored = batch["completion_mask"].bool()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    args = (batch["input_ids"], batch["attention_mask"], scored, positions)
    packing = logprobs._pack_shared_prompts(backbone, *args)
    real = int(batch["attention_mask"].sum())
    prompts = 180 + 40 + 300 + 90
    assert packing.groups == 4 and packing.input_ids.shape == (1, real - prompts)
    # chosen's call covers prompt and chosen; rejected's its own tokens over the prompt
    assert [(c.stop - c.start, c.mask is None) for c in packing.calls][:2] == [
        (240, True),
        (90, False),
    ]
    row = torch.arange(5, 25)[None]
    alone = logprobs._pack_shared_prompts(
        backbone, row, torch.ones_like(row), torch.ones_like(row).bool(), torch.arange(20)[None]
    )
    assert alone is None  # nothing to share, no padding: the plain forward
    backbone.config.model_type = "gemma2"  # softcapped attention: not written here
    assert logprobs._pack_shared_prompts(backbone, *args) is None
    backbone.config.model_type, backbone.config.sliding_window = "mistral", 64
    assert logprobs._pack_shared_prompts(backbone, *args) is None  # rows beyond the window
    backbone.config.sliding_window = 4096
    assert logprobs._pack_shared_prompts(backbone, *args) is not None


def test_bf16_weights_give_autocast_losses_and_fp32_grads(tiny_model):
    model = load_policy(tiny_model)
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = make_pairwise_loss("dpo", {"beta": 0.1})
    batch = collate_pairs(_pairs(), pad_id=0)
    batch["ref_logps"] = torch.tensor([[-80.0, -40.0], [-30.0, -90.0], [-60.0, -61.0]])
    with autocast(enabled=True):
        loss_autocast, metrics_autocast = loss_fn(model, batch)
    loss_autocast.backward()
    grads_autocast = _grads(model)
    model.zero_grad()
    with bf16_compute(model, enabled=True):
        with autocast(enabled=True):
            loss_fast, metrics_fast = loss_fn(model, batch)
        loss_fast.backward()
    fast, slow = float(loss_fast.detach()), float(loss_autocast.detach())
    assert abs(fast - slow) < 2e-2 * max(1.0, slow)
    for key in ("rewards/chosen", "rewards/rejected"):
        if key in metrics_autocast:
            assert abs(float(metrics_fast[key]) - float(metrics_autocast[key])) < 0.05
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter.detach(), masters[name])
        assert parameter.grad.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(
            parameter.grad.flatten(), grads_autocast[name].flatten(), dim=0
        )
        assert cosine > 0.98, (name, float(cosine))


def test_online_update_from_bf16_weights_matches_autocast(tiny_model, tokenizer):
    """The online recipes' update (bf16 copies of the weights and the fused layers, as
    OnlineRun.bf16_scope sets them) against autocast over the fp32 weights, on one
    rollout: log-probs, the GRPO loss and the gradients within bf16 tolerance."""
    model = load_policy(tiny_model)
    model.train()
    prompts = [tokenizer.encode(text) for text in ("a short prompt", "another one here")]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    with torch.no_grad():
        sampled = generate(model, tokenizer, prompts, params, num_samples=2, bf16=True)
    columns = slice(sampled.prompt_length, None)
    mask = sampled.completion_mask[:, columns].float()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def update() -> tuple[torch.Tensor, torch.Tensor]:
        new = forward_pass(
            model, sampled.input_ids, sampled.attention_mask, sampled.completion_mask,
            sampled.prompt_length, 1.0, bf16=True,
        )  # fmt: skip
        old = new.logps.detach() - 0.05  # off-policy enough for the ratio to matter
        loss, _ = grpo_loss(new.logps, old, old, advantages, mask, kl_coef=0.1)
        loss.backward()
        return new.logps.detach(), loss.detach()

    logps_plain, loss_plain = update()
    grads_plain = _grads(model)
    model.zero_grad()
    with bf16_compute(model, enabled=True), fused_layers(model) as swapped:
        logps_fast, loss_fast = update()
    assert swapped == 3 * len(model.model.layers) + 1  # each MLP and norm, the final norm
    assert torch.allclose(logps_fast * mask, logps_plain * mask, atol=0.05)
    assert abs(float(loss_fast) - float(loss_plain)) < 2e-2 * max(1.0, abs(float(loss_plain)))
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32 and parameter.grad.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(
            parameter.grad.flatten(), grads_plain[name].flatten(), dim=0
        )
        assert cosine > 0.98, (name, float(cosine))


def test_bf16_weights_accumulate_into_existing_grads(tiny_model):
    model = load_policy(tiny_model)
    ids = torch.randint(5, 3000, (2, 9))
    mask = torch.ones_like(ids)
    for _ in range(2):
        with bf16_compute(model, enabled=True):
            token_logps(model, ids, mask, mask).logps.sum().backward()
    twice = _grads(model)
    model.zero_grad()
    with bf16_compute(model, enabled=True):
        token_logps(model, ids, mask, mask).logps.sum().backward()
    for name, grad in _grads(model).items():
        assert torch.allclose(twice[name], 2 * grad, rtol=1e-3, atol=1e-6), name


def test_fused_adamw_matches_the_per_tensor_loop(tiny_model):
    models = [load_policy(tiny_model), load_policy(tiny_model)]
    optimizers = [build_optimizer(m, 1e-3, 0.01, 0, 10)[0] for m in models]
    use_fused_adam(optimizers[1])
    assert optimizers[1].param_groups[0]["fused"] is True
    assert not optimizers[0].param_groups[0]["fused"]
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers, strict=True):
            for parameter, grad in zip(model.parameters(), grads, strict=True):
                parameter.grad = grad.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_reference_scoring_grouped_by_prompt_matches_one_row_at_a_time(tiny_model):
    model = load_policy(tiny_model)
    sequences = [(p.prompt_ids, ids) for p in _pairs(3) for ids in (p.chosen_ids, p.rejected_ids)]
    together = score_sequences(model, sequences, pad_id=0, batch_size=4, bf16=False)
    alone = torch.cat(
        [score_sequences(model, [s], pad_id=0, batch_size=1, bf16=False) for s in sequences]
    )
    assert torch.allclose(together, alone, atol=1e-4)
    fast = score_sequences(model, sequences, pad_id=0, batch_size=4, bf16=True)
    assert torch.allclose(fast, alone, rtol=2e-2, atol=0.5)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _dpo_losses(tiny_model, data, out) -> list[float]:
    config = load_config(
        dpo.Config,
        "dpo",
        None,
        [
            f"model={tiny_model}",
            f"data={data}",
            f"output_dir={out}",
            "max_steps=4",
            "batch_size=4",
            "lr=1e-3",
            "bf16=true",
        ],
    )
    dpo.run(config)
    with open(out / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_dpo_run_fast_paths_match_plain_run(tiny_model, separable_prefs, tmp_path, monkeypatch):
    """The recipe end to end: packing + bf16 weights + fused AdamW vs none of them."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache-fast"))
    monkeypatch.setattr(logprobs, "_PACKING_GAIN", float("inf"))
    fast = _dpo_losses(tiny_model, separable_prefs, tmp_path / "fast")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache-plain"))
    monkeypatch.setattr(logprobs, "_PACKING_GAIN", 0.0)
    monkeypatch.setattr(loop, "use_fused_adam", lambda optimizer: None)

    @contextlib.contextmanager
    def autocast_only(model, enabled=None):
        yield

    monkeypatch.setattr(loop, "bf16_compute", autocast_only)
    monkeypatch.setattr("alignkit.reference.bf16_compute", autocast_only)
    plain = _dpo_losses(tiny_model, separable_prefs, tmp_path / "plain")
    assert len(fast) == len(plain) == 4
    for got, expected in zip(fast, plain, strict=True):
        assert abs(got - expected) < 2e-2, (fast, plain)


def test_runtime_env_preloads_the_allocator_once(tmp_path):
    library = tmp_path / "libfakemalloc.so"
    library.write_bytes(b"")
    environ = {"ALIGNKIT_ALLOCATOR": str(library), "LD_PRELOAD": "/x/other.so"}
    env = cli.runtime_env(environ, busy=lambda: True)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{library}:/x/other.so"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "TCMALLOC_SKIP_SBRK" not in env  # not tcmalloc: its settings are not added
    assert cli.runtime_env(env) is None  # the re-executed process does not loop
    idle = cli.runtime_env(environ, busy=lambda: False)
    assert "OMP_WAIT_POLICY" not in idle and idle["LD_PRELOAD"] == env["LD_PRELOAD"]

    def not_asked() -> bool:
        raise AssertionError("the user's OMP_WAIT_POLICY wins: no need to look")

    settled = {"ALIGNKIT_ALLOCATOR": "system", "OMP_WAIT_POLICY": "ACTIVE"}
    assert cli.runtime_env(settled, busy=not_asked) is None  # nothing to change: no re-exec
    missing = cli.runtime_env({"ALIGNKIT_ALLOCATOR": str(tmp_path / "missing.so")}, lambda: True)
    assert "LD_PRELOAD" not in missing and missing["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cli.runtime_env({"ALIGNKIT_ALLOCATOR": "system"}, busy=lambda: False) is None
    found = cli.find_allocator({})
    assert found is None or os.path.isfile(found)


def test_runtime_env_has_tcmalloc_map_its_memory_unless_the_user_said_otherwise(tmp_path):
    """tcmalloc's heap is kept off sbrk (huge pages then back it); a value the user set wins."""
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    environ = {"ALIGNKIT_ALLOCATOR": str(library)}
    env = cli.runtime_env(environ, busy=lambda: False)
    assert env["LD_PRELOAD"] == str(library)
    assert env["TCMALLOC_SKIP_SBRK"] == "true"
    mine = cli.runtime_env({**environ, "TCMALLOC_SKIP_SBRK": "false"}, busy=lambda: False)
    assert mine["TCMALLOC_SKIP_SBRK"] == "false"
    assert "TCMALLOC_SKIP_SBRK" not in cli.runtime_env(
        {"ALIGNKIT_ALLOCATOR": "system"}, lambda: True
    )


def test_machine_busy_reads_other_work_from_a_cpu_sample(monkeypatch):
    if os.path.exists("/proc/stat"):
        busy, total = cli._cpu_ticks()
        assert 0 < busy < total
    cpus = os.cpu_count() or 1
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.0 * cpus, 0.1, 0.1))  # not read
    samples = iter([(1000, 5000), (1000 + 30, 5000 + 100)])  # 30% of the sample busy
    monkeypatch.setattr(cli, "_cpu_ticks", lambda: next(samples))
    assert cli.machine_busy(sample_seconds=0.0)
    samples = iter([(1000, 5000), (1000 + 20, 5000 + 100)])  # 20%: idle enough
    monkeypatch.setattr(cli, "_cpu_ticks", lambda: next(samples))
    assert not cli.machine_busy(sample_seconds=0.0)
    monkeypatch.setattr(cli, "_cpu_ticks", lambda: None)  # no /proc/stat: the load decides
    assert cli.machine_busy(sample_seconds=0.0)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.4 * cpus, 0.1, 0.1))
    assert not cli.machine_busy(sample_seconds=0.0)


def test_prepacked_linears_sample_the_autocast_tokens_and_logps(tiny_model):
    assert prepacking_supported(torch.device("cpu"))  # this machine has AVX512-BF16
    model = load_policy(tiny_model)  # trainable, as the policy of an online step
    tokenizer = load_tokenizer(tiny_model)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 3000, (n,), generator=generator).tolist() for n in (13, 5, 9)]
    probe = torch.tensor([prompts[0]])
    with torch.no_grad(), autocast(enabled=True):
        before = model(input_ids=probe).logits
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=7)
    plain = generate(model, tokenizer, prompts, params, 2, bf16=True, prepack=False)
    fast = generate(
        model, tokenizer, prompts, params, 2, bf16=True, prepack=True, fast_decode=False
    )
    assert torch.equal(fast.input_ids, plain.input_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    assert plain.completion_lengths.sum() >= 12  # something was sampled
    assert torch.allclose(fast.sampling_logps, plain.sampling_logps, atol=1e-6)
    # the model's own linears are back: no instance forward left, same logits as before
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad(), autocast(enabled=True):
        assert torch.equal(model(input_ids=probe).logits, before)


def test_length_buckets_by_hand():
    lengths = [13, 5, 9, 30, 31, 4, 60]
    # sorted 4 5 9 13 | 30 31 | 60: 4*13 + 2*31 + 60 + 3*32 = 270, against one group
    # 7*60 + 32 = 452 and e.g. 4 5 9 13 | 30 31 60: 52 + 180 + 64 = 296
    assert length_buckets(lengths, overhead=32) == [[5, 1, 2, 0], [3, 4], [6]]
    assert length_buckets(lengths, overhead=10**6) == [[5, 1, 2, 0, 3, 4, 6]]
    assert length_buckets([7, 7, 7], overhead=0) == [[0, 1, 2]]  # no padding to save


def _prompts(lengths, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 3000, (n,), generator=generator).tolist() for n in lengths]


def test_bucketed_prefill_samples_the_tokens_of_one_padded_batch(tiny_model, monkeypatch):
    model = load_policy(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    prompts = _prompts([13, 5, 9, 30, 31, 4, 60])
    assert len(length_buckets([len(p) for p in prompts])) > 1
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    fast = generate(model, tokenizer, prompts, params, 2, bf16=False)
    monkeypatch.setattr(rollout, "_BUCKET_OVERHEAD", 10**9)  # one padded batch
    plain = generate(model, tokenizer, prompts, params, 2, bf16=False)
    assert torch.equal(fast.input_ids, plain.input_ids)
    assert torch.allclose(fast.sampling_logps, plain.sampling_logps, atol=1e-5)


def test_bucketed_prefill_bf16_logits_and_cache_within_tolerance(tiny_model, monkeypatch):
    model = load_policy(tiny_model).eval()
    prompts = _prompts([13, 5, 9, 30, 31, 4, 60], seed=5)
    ids, mask = rollout._left_pad(prompts, 0, torch.device("cpu"))
    real = mask.bool()  # (B, P) slots that hold a prompt token

    def prefill():
        cache = rollout._new_cache(model, ids.shape[1] + 4)
        with torch.no_grad(), autocast(enabled=True):
            logits, cache_mask = rollout._prefill(model, cache, prompts, 0, torch.device("cpu"))
        assert torch.equal(cache_mask, mask)  # no prefix shared: the left-padded batch's
        return logits, cache.layers[-1].keys, cache.layers[-1].values

    fast = prefill()
    monkeypatch.setattr(rollout, "_BUCKET_OVERHEAD", 10**9)
    plain = prefill()
    assert fast[1].shape == plain[1].shape == (7, 2, 60, 16)  # (B, KV heads, P, head dim)
    scale = plain[0].abs().max()
    assert (fast[0] - plain[0]).abs().max() <= 0.02 * scale  # bf16: 8 mantissa bits
    for got, want in zip(fast[1:], plain[1:], strict=True):
        keep = real[:, None, :, None].expand_as(want)
        assert torch.allclose(got[keep].float(), want[keep].float(), atol=0.02 * want.abs().max())
        assert (got[~keep] == 0).all()  # left of a short prompt: zeros, never garbage


def test_shared_prefix_length_by_hand():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 6, 7]]
    assert shared_prefix_length(prompts, overhead=0) == 3
    assert shared_prefix_length(prompts, overhead=5) == 3  # saves 2 x 3 = 6 > 5 tokens
    assert shared_prefix_length(prompts, overhead=6) == 0  # 6 saved do not pay for 6
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3], [1, 2, 3, 4]], overhead=0) == 2  # a last
    assert shared_prefix_length([[7, 2], [1, 2]], overhead=0) == 0  # token of its own each
    assert shared_prefix_length([[1, 2, 3, 4]], overhead=0) == 0  # nothing to share with


def _with_head(lengths, seed=6, head=20):
    """Prompts of ``head`` common tokens (a chat template's system turn), then their own."""
    common = _prompts([head], seed=seed + 100)[0]
    return [common + own for own in _prompts(lengths, seed=seed)]


@pytest.mark.parametrize("fast_decode", [False, True])
def test_shared_prefix_samples_the_tokens_of_one_padded_batch(tiny_model, fast_decode, monkeypatch):
    model = load_policy(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    prompts = _with_head([3, 1, 9, 30, 31, 2, 12])
    assert shared_prefix_length(prompts) == 20
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    args = (model, tokenizer, prompts, params, 2)
    shared = generate(*args, bf16=False, fast_decode=fast_decode, first_row=0)
    monkeypatch.setattr(rollout, "_BUCKET_OVERHEAD", 10**9)  # one padded batch, no prefix
    assert shared_prefix_length(prompts) == 0
    plain = generate(*args, bf16=False, fast_decode=fast_decode, first_row=0)
    assert torch.equal(shared.input_ids, plain.input_ids)
    assert torch.equal(shared.attention_mask, plain.attention_mask)  # the rollout's layout
    assert torch.allclose(shared.sampling_logps, plain.sampling_logps, atol=1e-5)
    assert plain.completion_lengths.sum() >= 14 * 4


@pytest.mark.parametrize("lengths", [[3, 1, 9, 30, 31, 2, 12], [4, 6, 5]])  # groups, one group
def test_shared_prefix_bf16_logits_and_cache_within_tolerance(tiny_model, lengths, monkeypatch):
    """Each row's cache: the prefix's states first, padding, then the rest of its prompt's."""
    model = load_policy(tiny_model).eval()
    prompts = _with_head(lengths, seed=7)
    ids, mask = rollout._left_pad(prompts, 0, torch.device("cpu"))

    def prefill():
        cache = rollout._new_cache(model, ids.shape[1] + 4)
        with torch.no_grad(), autocast(enabled=True):
            logits, cache_mask = rollout._prefill(model, cache, prompts, 0, torch.device("cpu"))
        return logits, cache_mask, cache.layers[-1].keys, cache.layers[-1].values

    shared = prefill()
    monkeypatch.setattr(rollout, "_BUCKET_OVERHEAD", 10**9)
    plain = prefill()
    assert torch.equal(plain[1], mask)
    # the prefix's 20 slots, padding, then the rest of the prompt (e.g. 20 + 30 + 1 of 51)
    for row, own in enumerate(lengths):
        assert shared[1][row].tolist() == [1] * 20 + [0] * (max(lengths) - own) + [1] * own
    scale = plain[0].abs().max()
    assert (shared[0] - plain[0]).abs().max() <= 0.02 * scale  # bf16: 8 mantissa bits
    for got, want in zip(shared[2:], plain[2:], strict=True):
        for row in range(len(prompts)):  # the same states, in the same order
            mine, theirs = got[row][:, shared[1][row].bool()], want[row][:, mask[row].bool()]
            assert torch.allclose(mine.float(), theirs.float(), atol=0.02 * theirs.abs().max())
            # a masked slot must hold a finite number (0 x NaN in the products would be
            # NaN): zeros, or a group's pad position's states (it attended the prefix)
            assert torch.isfinite(got[row]).all()


@pytest.mark.parametrize("lora", [False, True])
def test_reward_scores_share_the_prompt_with_the_plain_forwards_numbers(
    tiny_model, lora, monkeypatch, always_pack
):
    """The packed reward forward gives the classifier's own scores and gradients."""
    from alignkit.models import LoraSettings, load_reward_backbone
    from alignkit.recipes.reward import _backbone_and_head, reward_scores

    torch.manual_seed(0)
    model = load_reward_backbone(tiny_model, LoraSettings(r=4) if lora else None)
    assert _backbone_and_head(model) is not None
    batch = collate_pairs(_pairs(), pad_id=0)
    args = (batch["input_ids"], batch["attention_mask"])
    packed_rows = []
    pack = logprobs._pack_shared_prompts

    def spy(*pack_args):
        packing = pack(*pack_args)
        packed_rows.append(None if packing is None else packing.groups)
        return packing

    monkeypatch.setattr(logprobs, "_pack_shared_prompts", spy)
    fast = reward_scores(model, *args, batch["completion_mask"])
    assert packed_rows == [3]  # one sequence per pair: each prompt ran once
    fast.sum().backward()
    fast_grads = _grads(model)
    model.zero_grad()
    plain = model(input_ids=args[0], attention_mask=args[1]).logits[:, 0]
    plain.sum().backward()
    assert fast.shape == (batch["input_ids"].shape[0],)
    assert torch.allclose(fast, plain, atol=1e-5), (fast, plain)
    assert len(fast_grads) > 0
    for name, grad in _grads(model).items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=1e-4), name
