"""Micro-batches: a seeded, resumable order over the examples, and right-padded tensors (`collate`)."""

import functools
from typing import Iterator

import torch

from qlora_trainer.data.prepare import IGNORE_INDEX


@functools.lru_cache(maxsize=4)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n_examples, generator=generator).tolist())


def micro_batches(n_examples: int, micro_batch_size: int, seed: int, start_example: int) -> Iterator[list[int]]:
    """An endless, seeded stream of example indices, one list per micro-batch, from example `start_example` on.

    Epoch e is a permutation drawn from a generator seeded with (seed, e), and a micro-batch runs on into the
    next epoch when one ends, so the stream can be re-entered at any example, with any micro-batch size.
    """
    position = start_example
    while True:
        batch = []
        for _ in range(micro_batch_size):
            epoch, offset = divmod(position, n_examples)
            batch.append(_epoch_order(n_examples, seed, epoch)[offset])
            position += 1
        yield batch


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_token_id, attention_mask 0 and labels -100 on pads.

    Packed rows (data/prepare.py `pack`) bring position_ids that restart at every example; a row's padding
    continues them as one more sequence of its own (0, 1, ...), so the pads, like each example, attend only
    among themselves (engine/loss.py).
    """
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "position_ids" in examples[0]:
        positions = [example["position_ids"] + list(range(length - len(example["position_ids"])))
                     for example in examples]
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
    return batch
