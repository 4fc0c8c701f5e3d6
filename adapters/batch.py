"""Rendered samples (ids, labels, image slots) padded into one batch of tensors: the one place that pads."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from align.templates import IGNORE_INDEX


class RenderedLike(Protocol):
    """What a batch is made of: a rendered sample or prompt."""

    input_ids: list[int]
    labels: list[int]
    images: list[tuple[int, int]]


@dataclass
class PaddedBatch:
    """[B, T] tensors; padding is never attended to nor learnt."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor  # True on image slots

    def to(self, device: torch.device) -> "PaddedBatch":
        """The same batch on `device`."""
        return PaddedBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.attention_mask, self.image_mask)))


def pad_batch(samples: Sequence[RenderedLike], pad_id: int, *, left: bool = False) -> PaddedBatch:
    """Pad to the longest sample: on the right for training, on the `left` for generation (every prompt then ends
    where generation starts)."""
    longest = max(len(s.input_ids) for s in samples)
    batch = PaddedBatch(
        torch.full((len(samples), longest), pad_id, dtype=torch.long),
        torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long),
        torch.zeros((len(samples), longest), dtype=torch.long),
        torch.zeros((len(samples), longest), dtype=torch.bool),
    )
    for b, sample in enumerate(samples):
        n = len(sample.input_ids)
        start = longest - n if left else 0
        batch.input_ids[b, start:start + n] = torch.tensor(sample.input_ids)
        batch.labels[b, start:start + n] = torch.tensor(sample.labels)
        batch.attention_mask[b, start:start + n] = 1
        for slot, length in sample.images:
            batch.image_mask[b, start + slot:start + slot + length] = True
    return batch
