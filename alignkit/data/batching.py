"""Batches: length-grouped index order, and collators that pad to the longest row in the batch.

Training batches are right-padded (``input_ids``, ``attention_mask``, and a
``completion_mask`` marking the tokens the loss is taken on); generation batches are
left-padded so every row's next token is at the last position. Masks come from row
lengths, never from comparing ids with ``pad_id`` (the pad token is often EOS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignkit.data.tokenize import TokenizedPair, TokenizedSFT, TokenizedUnpaired

MEGA_BATCH_FACTOR = 50
"""Rows are sorted by length within windows of ``MEGA_BATCH_FACTOR * batch_size`` rows."""


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    mega_batch_factor: int = MEGA_BATCH_FACTOR,
) -> list[list[int]]:
    """Index batches of similar-length rows, in a random order fixed by ``seed`` and ``epoch``.

    Shuffle all indices, cut them into mega-batches of ``mega_batch_factor * batch_size``,
    sort each mega-batch by length (longest first), cut it into batches, and shuffle
    the batch order. Every index appears exactly once; only the last batch of each
    mega-batch can be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    lengths_array = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lengths_array))
    mega_batch_size = batch_size * max(1, mega_batch_factor)
    batches: list[list[int]] = []
    for start in range(0, len(order), mega_batch_size):
        mega_batch = order[start : start + mega_batch_size]
        by_length = mega_batch[np.argsort(-lengths_array[mega_batch], kind="stable")]
        for batch_start in range(0, len(by_length), batch_size):
            batches.append(
                [int(index) for index in by_length[batch_start : batch_start + batch_size]]
            )
    batch_order = rng.permutation(len(batches))
    return [batches[position] for position in batch_order]


def _right_pad(
    rows: Sequence[Sequence[int]], masked_from: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` to the longest; ``completion_mask`` is True from ``masked_from[i]`` on."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    for index, (row, start) in enumerate(zip(rows, masked_from, strict=True)):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
        completion_mask[index, start : len(row)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def collate_sft(items: Sequence[TokenizedSFT], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` (B, T), ``attention_mask`` (B, T) long, ``completion_mask`` (B, T) bool.

    ``completion_mask`` is True on completion tokens only, where the SFT loss is taken.
    """
    rows = [item.prompt_ids + item.completion_ids for item in items]
    return _right_pad(rows, [len(item.prompt_ids) for item in items], pad_id)


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, T) batch, so one forward scores both.

    Rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected, padded to the
    longest of all 2B. Also ``margin`` (B,) float, 0 where a pair has none.
    """
    chosen_rows = [item.prompt_ids + item.chosen_ids for item in items]
    rejected_rows = [item.prompt_ids + item.rejected_ids for item in items]
    prompt_lengths = [len(item.prompt_ids) for item in items]
    batch = _right_pad(chosen_rows + rejected_rows, prompt_lengths + prompt_lengths, pad_id)
    margins = [0.0 if item.margin is None else float(item.margin) for item in items]
    batch["margin"] = torch.tensor(margins, dtype=torch.float32)  # (B,)
    return batch


def collate_unpaired(items: Sequence[TokenizedUnpaired], pad_id: int) -> dict[str, torch.Tensor]:
    """As :func:`collate_sft`, plus ``label`` (B,) bool (True = desirable)."""
    rows = [item.prompt_ids + item.completion_ids for item in items]
    batch = _right_pad(rows, [len(item.prompt_ids) for item in items], pad_id)
    batch["label"] = torch.tensor([bool(item.label) for item in items], dtype=torch.bool)  # (B,)
    return batch


def collate_prompts(
    prompt_id_lists: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``input_ids`` (B, T) and ``attention_mask`` (B, T)."""
    if not prompt_id_lists:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ids) for ids in prompt_id_lists)
    input_ids = torch.full((len(prompt_id_lists), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompt_id_lists), width), dtype=torch.long)  # (B, T)
    for index, ids in enumerate(prompt_id_lists):
        if ids:
            input_ids[index, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[index, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_sequences_for_reward(
    ids_lists: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded full sequences for a sequence classifier: ``input_ids``, ``attention_mask`` (B, T).

    The reward is read at each row's last real token, position ``attention_mask.sum(1) - 1``.
    """
    batch = _right_pad(list(ids_lists), [len(ids) for ids in ids_lists], pad_id)
    del batch["completion_mask"]
    return batch
