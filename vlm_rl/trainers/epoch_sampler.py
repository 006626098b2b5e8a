"""TRL's prompt sampler with an order that depends only on the seed and the epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler


class EpochSeededSampler(Sampler[int]):
    """TRL's `RepeatSampler` draws each epoch's order from one generator that advances epoch by epoch, and a resumed
    run builds a fresh one: resumed in epoch 2, it would replay epoch 0's order. Seeding the generator with
    `seed + epoch` at every epoch (the trainer calls `set_epoch`) gives a resumed run the order the stopped one had.
    """

    def __init__(self, sampler: RepeatSampler):
        self.sampler = sampler

    @property
    def generator(self) -> torch.Generator | None:
        """accelerate synchronizes this generator over processes before every epoch."""
        return getattr(self.sampler, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler.shuffle:
            self.sampler.generator.manual_seed((self.sampler.seed or 0) + epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
