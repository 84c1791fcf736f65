"""Deterministic, resumable sample order: the order of an epoch is a function of (seed, epoch) only,
so a resumed run can rebuild it and skip the samples it already consumed.

Map-style datasets use `ResumableSampler` (a DistributedSampler that can start mid-epoch). Tar
shards use `assign_shards` (shards split across ranks, then across DataLoader workers) and
`buffer_shuffle`, both seeded from (seed, epoch, ...) so that re-reading a stream repeats it.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
from torch.utils.data import Sampler

from vlbridge.data.records import DataError

Item = TypeVar("Item")


def rng_for(*keys: int) -> np.random.Generator:
    """A generator determined by the keys alone (seed, epoch, rank, worker...), not by global state."""
    if any(k < 0 for k in keys):
        raise DataError(f"seeds, epochs, ranks and workers must be >= 0, got {keys}")
    return np.random.default_rng(list(keys))


def epoch_order(length: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The dataset indices of one epoch, in order: a permutation of range(length) fixed by (seed, epoch)."""
    if not shuffle:
        return list(range(length))
    return rng_for(seed, epoch).permutation(length).tolist()


class ResumableSampler(Sampler[int]):
    """This rank's indices for an epoch, optionally starting after the first `start` of them.

    Across ranks the epoch order is padded (by repeating its start) to a multiple of the world size,
    or cut with `drop_last`, so every rank yields the same number of samples, as DistributedSampler.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if length < 1:
            raise DataError("the dataset is empty; a sampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0 .. world_size - 1 = {world_size - 1}")
        if drop_last and length < world_size:
            raise DataError(f"drop_last with {length} samples for {world_size} ranks leaves every rank empty")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (reshuffles) and how many of this rank's samples to skip (resume)."""
        if not 0 <= start <= self.per_rank:
            raise DataError(f"cannot start at sample {start} of an epoch of {self.per_rank} samples per rank")
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        """Samples each rank sees in a whole epoch."""
        whole, rest = divmod(self.length, self.world_size)
        return whole if self.drop_last or rest == 0 else whole + 1

    def rank_order(self) -> list[int]:
        """This rank's whole epoch, before skipping."""
        order = epoch_order(self.length, self.seed, self.epoch, self.shuffle)
        total = self.per_rank * self.world_size
        order = (order * (total // self.length + 1))[:total]  # pad by repeating; or cut, with drop_last
        return order[self.rank :: self.world_size]

    def repeats(self) -> frozenset[int]:
        """The dataset indices this rank reads only to pad the epoch: each is another rank's sample
        too, so an evaluation that counts them counts that sample twice. At most one per rank, the
        last of its order, and never one of its own samples (the padding repeats the first
        `world_size` positions, which fall to other ranks whenever there is padding)."""
        if self.drop_last:
            return frozenset()
        order = epoch_order(self.length, self.seed, self.epoch, self.shuffle)
        padded = range(self.length, self.per_rank * self.world_size)
        return frozenset(order[position % self.length] for position in padded if position % self.world_size == self.rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def assign_shards(
    shards: Sequence[str], *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards one DataLoader worker of one rank reads this epoch (shuffled the same on every rank)."""
    order = [shards[i] for i in epoch_order(len(shards), seed, epoch, shuffle)]
    mine = order[rank::world_size]
    if not mine:
        raise DataError(f"rank {rank} of {world_size} gets no shard: {len(shards)} shards for {world_size} ranks; give at least one shard per rank")
    return mine[worker::num_workers]


def buffer_shuffle(items: Iterable[Item], size: int, rng: np.random.Generator) -> Iterator[Item]:
    """Shuffle a stream through a buffer of `size` items (0 or 1: keep the order), deterministically."""
    if size <= 1:
        yield from items
        return
    buffer: list[Item] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list[Item], rng: np.random.Generator) -> Item:
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()
