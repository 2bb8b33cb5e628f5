"""The reference log-prob cache: its key holds the compute dtype and the device type, so
numbers scored on a GPU (whose bf16 kernels round differently) are never served to a CPU
run and back. Nothing runs on a GPU here: the key is a pure function of its inputs."""

from __future__ import annotations

import functools

import torch

from alignkit.reference import cached_reference_logps, reference_cache_key

SEQUENCES = [([1, 2, 3], [4, 5]), ([1, 2], [6])]


def test_cache_key_changes_with_the_device_type_and_the_compute_dtype(tiny_model, tokenizer):
    key = functools.partial(reference_cache_key, tiny_model, tokenizer, SEQUENCES)
    cpu = key(False, "cpu")
    assert len(cpu) == 32 and int(cpu, 16) >= 0
    assert key(False, torch.device("cpu")) == cpu  # a string or a device, the same key
    assert key(False, "cuda:0") != cpu
    assert key(True, "cuda") != key(True, "cpu")
    # the type, not the index: every GPU of a node serves one entry
    assert key(False, "cuda:0") == key(False, "cuda:1") == key(False, torch.device("cuda"))
    assert key(True, "cpu") != cpu  # bf16 against fp32 compute
    assert key(True, "cuda") != key(False, "cuda")
    assert reference_cache_key(tiny_model, tokenizer, SEQUENCES[:1], False, "cpu") != cpu


def test_an_entry_is_served_only_to_the_device_type_that_scored_it(
    tiny_model, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    scored: list[str] = []

    def scorer(where: str, value: float):
        def compute() -> torch.Tensor:
            scored.append(where)
            return torch.full((len(SEQUENCES),), value)

        return compute

    def cached(where: str, value: float) -> tuple[list[float], bool]:
        logps, hit = cached_reference_logps(
            tiny_model, tokenizer, SEQUENCES, scorer(where, value), False, where
        )
        return logps.tolist(), hit

    assert cached("cpu", -1.5) == ([-1.5, -1.5], False)
    assert cached("cpu", -9.0) == ([-1.5, -1.5], True)  # the CPU's entry, not rescored
    assert cached("cuda:0", -2.5) == ([-2.5, -2.5], False)  # not the CPU's numbers
    assert cached("cuda:1", -9.0) == ([-2.5, -2.5], True)
    assert scored == ["cpu", "cuda:0"]
    assert len(list((tmp_path / "reference_logps").glob("*.pt"))) == 2
