"""Length-grouped batch order and the padding collators."""

from __future__ import annotations

import numpy as np
import torch

from alignkit.data import (
    TokenizedPair,
    TokenizedSFT,
    TokenizedUnpaired,
    collate_pairs,
    collate_prompts,
    collate_sequences_for_reward,
    collate_sft,
    collate_unpaired,
    length_grouped_batches,
)

PAD = 0


def padded_tokens(batches: list[list[int]], lengths: np.ndarray) -> int:
    """Tokens a batch order costs when each batch is padded to its longest row."""
    return sum(len(batch) * int(lengths[batch].max()) for batch in batches)


def skewed_lengths(count: int = 2000) -> np.ndarray:
    return np.random.default_rng(0).lognormal(mean=4.0, sigma=1.0, size=count).astype(int) + 1


def test_every_index_once_per_epoch_and_deterministic():
    lengths = skewed_lengths(1003)
    batches = length_grouped_batches(lengths, batch_size=8, seed=1, epoch=0)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(1003))
    assert all(1 <= len(batch) <= 8 for batch in batches)
    assert sum(len(batch) < 8 for batch in batches) <= 3  # one short batch per mega-batch of 400
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=1, epoch=1)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=2, epoch=0)


def test_grouping_pads_far_less_than_random_batches_on_skewed_lengths():
    lengths = skewed_lengths()
    grouped = length_grouped_batches(lengths, batch_size=8, seed=0, epoch=0)
    order = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [order[start : start + 8].tolist() for start in range(0, len(order), 8)]
    real_tokens = int(lengths.sum())
    grouped_padding = padded_tokens(grouped, lengths) - real_tokens
    random_padding = padded_tokens(random_batches, lengths) - real_tokens
    assert grouped_padding < 0.1 * random_padding
    # batch order is shuffled: the longest batch is not always first
    firsts = {
        int(lengths[length_grouped_batches(lengths, 8, seed, 0)[0]].max()) for seed in range(5)
    }
    assert len(firsts) > 1


def test_collate_sft_pads_right_to_longest_row_and_masks_completion():
    items = [TokenizedSFT([5, 6], [7, 8, 2]), TokenizedSFT([9], [2])]
    batch = collate_sft(items, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
    ]
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_masks_come_from_lengths_even_when_pad_is_eos():
    batch = collate_sft([TokenizedSFT([5], [2]), TokenizedSFT([5], [6, 7, 2])], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 2, 2, 2], [5, 6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["completion_mask"][0].tolist() == [False, True, False, False]


def test_collate_pairs_stacks_chosen_then_rejected():
    items = [
        TokenizedPair([1, 2], [3, 2], [4, 4, 4, 2], margin=1.5),
        TokenizedPair([5], [6, 2], [7, 2], margin=None),
    ]
    batch = collate_pairs(items, pad_id=PAD)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 2, 0, 0],  # chosen 0
        [5, 6, 2, 0, 0, 0],  # chosen 1
        [1, 2, 4, 4, 4, 2],  # rejected 0
        [5, 7, 2, 0, 0, 0],  # rejected 1
    ]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 6, 3]
    assert batch["completion_mask"].int().tolist() == [
        [0, 0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 1, 1, 0, 0, 0],
    ]
    assert batch["margin"].tolist() == [1.5, 0.0]
    assert batch["margin"].dtype == torch.float32


def test_collate_unpaired_carries_labels():
    items = [TokenizedUnpaired([1], [2], True), TokenizedUnpaired([3, 4], [5, 2], False)]
    batch = collate_unpaired(items, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 2]]
    assert batch["completion_mask"].int().tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]
    assert batch["label"].tolist() == [True, False]
    assert batch["label"].dtype == torch.bool


def test_collate_prompts_pads_left_for_generation():
    batch = collate_prompts([[1, 2, 3], [4]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_sequences_for_reward_pads_right():
    batch = collate_sequences_for_reward([[1, 2, 3], [4, 5]], pad_id=9)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    last_token = batch["attention_mask"].sum(1) - 1
    assert batch["input_ids"][torch.arange(2), last_token].tolist() == [3, 5]
