"""The native decode-step kernels against the same arithmetic written out in fp32 PyTorch."""

from __future__ import annotations

import pytest
import torch

from alignkit import native

HEADS, KV_HEADS = 6, 2


def _case(n: int, head_dim: int, slot: int, capacity: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = (HEADS + 2 * KV_HEADS) * head_dim
    # a wider buffer than the fused product, as a row view of a larger one would be
    qkv = torch.randn(n, width + 8, generator=generator).bfloat16()[:, :width]
    angles = torch.rand(n, head_dim // 2, generator=generator) * 6.0
    angles = torch.cat([angles, angles], dim=-1)
    keys = torch.randn(n, KV_HEADS, capacity, head_dim, generator=generator).bfloat16()
    values = torch.randn(n, KV_HEADS, capacity, head_dim, generator=generator).bfloat16()
    keep = torch.ones(n, slot + 1, dtype=torch.bool)
    for row in range(n):  # row r left-padded by 3r slots
        keep[row, : min(3 * row, slot)] = False
    if n > 1:  # and the last row attends only its own slot
        keep[-1, :slot] = False
    return qkv, angles.cos(), angles.sin(), keys, values, keep


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _reference(qkv, cos, sin, keys, values, keep, slot, scale):
    """RoPE, the cache write and grouped-query attention, from the definitions, in fp32."""
    n, kv_heads, _, head_dim = keys.shape
    x = qkv.float()
    split = [HEADS * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    query, key, value = (part.unflatten(-1, (-1, head_dim)) for part in x.split(split, -1))
    query = _rotated(query, cos[:, None], sin[:, None]).bfloat16()
    keys, values = keys.clone(), values.clone()
    keys[:, :, slot] = _rotated(key, cos[:, None], sin[:, None]).bfloat16()
    values[:, :, slot] = value.bfloat16()
    group = HEADS // kv_heads
    scores = torch.einsum(
        "nhgd,nhwd->nhgw",
        query.float().view(n, kv_heads, group, head_dim),
        keys[:, :, : slot + 1].float(),
    )
    scores = (scores * scale).masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgw,nhwd->nhgd", scores.softmax(-1), values[:, :, : slot + 1].float())
    return out.reshape(n, HEADS * head_dim), keys, values


def _measure(kernels, n: int, head_dim: int, slot: int, capacity: int) -> dict:
    """Run the kernel on a random case and measure it against :func:`_reference`.

    ``key_steps``: the new key's worst error in bf16 steps (2^-7 of its size);
    ``output_over_bound``: the output's worst error over one bf16 rounding (2^-8 of its
    size) plus 1e-3 for fp32 sums in another order; ``output_scale``: its largest value;
    ``value_exact``, ``others_untouched``: the new value copied as it is, every other
    slot left as it was; ``last_row_exact``: the last row, which keeps only its own slot,
    outputs that slot's value exactly (None with one row).
    """
    qkv, cos, sin, keys, values, keep = _case(n, head_dim, slot, capacity)
    scale = head_dim**-0.5
    expected, expected_keys, expected_values = _reference(
        qkv, cos, sin, keys, values, keep, slot, scale
    )
    before_keys, before_values = keys.clone(), values.clone()
    out = torch.empty(n, HEADS * head_dim, dtype=torch.bfloat16)
    native.decode_attention(kernels, qkv, cos, sin, keys, values, keep, out, HEADS, slot, scale)
    new_key, reference_key = keys[:, :, slot].float(), expected_keys[:, :, slot].float()
    key_step = reference_key.abs() * 2**-7 + 1e-30  # (a zero key must then be exact)
    others = torch.ones(capacity, dtype=torch.bool)
    others[slot] = False
    error = (out.float() - expected).abs()
    last_row = None
    if n > 1:
        new_value = values[-1, :, slot].repeat_interleave(HEADS // KV_HEADS, 0).flatten()
        last_row = torch.equal(out[-1], new_value)
    return {
        "key_steps": float(((new_key - reference_key).abs() / key_step).max()),
        "value_exact": torch.equal(values[:, :, slot], expected_values[:, :, slot]),
        "others_untouched": torch.equal(keys[:, :, others], before_keys[:, :, others])
        and torch.equal(values[:, :, others], before_values[:, :, others]),
        "output_over_bound": float((error / (expected.abs() * 2**-8 + 1e-3)).max()),
        "output_scale": float(expected.abs().max()),
        "last_row_exact": last_row,
    }


@pytest.fixture(scope="module")
def kernels():
    loaded = native.library()
    assert loaded is not None, "the native kernels did not build on this machine"
    return loaded


@pytest.mark.parametrize(
    ("n", "head_dim", "slot", "capacity"),
    [(1, 64, 0, 4), (4, 64, 37, 40), (32, 64, 117, 149), (5, 16, 20, 21), (3, 32, 9, 64)],
)
def test_kernel_matches_attention_written_out_in_fp32(kernels, n, head_dim, slot, capacity):
    """head_dim 64 takes the AVX512-BF16 dot products where the CPU has them; 16 and 32 the plain loop."""
    measured = _measure(kernels, n, head_dim, slot, capacity)
    # the new key is rotated in fp32 and rounded once: at most one bf16 step from the
    # reference (the kernel may fuse a multiply-add the reference rounds in two)
    assert measured["key_steps"] <= 1.0
    assert measured["value_exact"] and measured["others_untouched"]
    assert measured["output_scale"] > 0.1  # a real output, not zeros
    assert measured["output_over_bound"] <= 1.0
    assert measured["last_row_exact"] is (None if n == 1 else True)


def test_portable_build_matches_too(tmp_path):
    """Without -march=native the kernel compiles to its plain loops; they agree as well."""
    compiler = native._compiler()
    assert compiler is not None
    flags = ("-O2", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")
    path = native.build(compiler, flags, directory=tmp_path)
    kernels = native.load(path)
    for n, head_dim, slot, capacity in [(4, 64, 37, 40), (2, 16, 5, 8)]:
        measured = _measure(kernels, n, head_dim, slot, capacity)
        assert measured["key_steps"] <= 1.0 and measured["output_over_bound"] <= 1.0
        assert measured["value_exact"] and measured["others_untouched"]
        assert measured["last_row_exact"] is True
    _check_norm_and_silu(kernels, 4, 96)


def _check_norm_and_silu(kernels, n: int, size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, size, generator=generator) * 3
    delta = torch.randn(n, size + 4, generator=generator).bfloat16()[:, :size]  # rows apart
    weight = torch.rand(size, generator=generator) + 0.5
    out = torch.empty(n, size, dtype=torch.bfloat16)
    summed = hidden + delta.float()
    expected = torch.nn.functional.rms_norm(summed, (size,), weight, 1e-5)
    native.add_rms_norm(kernels, hidden, delta, weight, out, 1e-5)
    assert torch.allclose(hidden, summed, rtol=0, atol=0)  # fp32 adds: the same sums
    # one rounding to bf16 (relative 2^-8) over fp32 sums in another order
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()
    native.add_rms_norm(kernels, hidden, None, weight, out, 1e-5)  # no residual to add
    assert torch.allclose(hidden, summed, rtol=0, atol=0)
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()

    # gates across the whole range the polynomial exp covers, and past it both ways
    gate_up = torch.randn(n, 2 * size, generator=generator).bfloat16() * 8
    gate_up[0, :4] = torch.tensor([0.0, -100.0, 100.0, -0.5])
    activated = torch.empty(n, size, dtype=torch.bfloat16)
    native.silu_mul(kernels, gate_up, activated)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    # silu(gate) x up rounded once (the PyTorch step rounds twice)
    assert ((activated.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-30).all()
    assert activated[0, 0] == 0 and activated[0, 1] == 0  # silu(0) = 0, silu(-100) = -0


@pytest.mark.parametrize(("n", "size"), [(1, 576), (32, 576), (3, 40)])
def test_residual_norm_and_silu_match_pytorch_in_fp32(kernels, n, size):
    _check_norm_and_silu(kernels, n, size)


def test_build_is_cached_per_source_flags_and_machine(tmp_path):
    compiler = native._compiler()
    first = native.build(compiler, directory=tmp_path)
    built_at = first.stat().st_mtime_ns
    assert native.build(compiler, directory=tmp_path) == first
    assert first.stat().st_mtime_ns == built_at  # not compiled again
    other = native.build(compiler, ("-O1", *native.FLAGS[1:]), directory=tmp_path)
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


def test_without_a_working_compiler_the_kernels_are_off_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native decode kernels are off"):
            assert native.library() is None
        native.library.cache_clear()
        monkeypatch.setenv("ALIGNKIT_NATIVE", "0")
        assert native.library() is None
        assert not any(tmp_path.rglob("*.so"))  # nothing half-built left behind
    finally:
        native.library.cache_clear()


def test_kernels_run_on_torchs_openmp_runtime_beside_another_one():
    """Their parallel loops share torch's OpenMP threads (two pools would contend), also
    when another library brought its own runtime (scikit-learn ships one)."""
    import sklearn.utils._openmp_helpers  # noqa: F401  (loads scikit-learn's libgomp)

    native.library.cache_clear()
    kernels = native.library()
    assert kernels is not None
    provider = native.openmp_provider(kernels)
    assert provider is not None and "torch" in provider
    assert provider == native.torch_openmp_provider()
