"""What the trainer feeds the objective: datasets from the config, an endless stream of batches that
keeps the data position, and batches moved to the device.

`build_dataset_for` is the one place a dataset is made; a frozen-feature cache (`data.features`)
plugs in there and yields batches with `image_embeds` instead of `pixel_values`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from vlbridge.data import DataConfig, DataError
from vlbridge.data.batching import DataProgress, select_items
from vlbridge.data.build import build_dataset, make_loader, read_records
from vlbridge.data.datasets import RecordDataset, TextOptions
from vlbridge.data.order import ResumableSampler
from vlbridge.data.transforms import eval_transform
from vlbridge.errors import VLBridgeError
from vlbridge.modeling.model import VLBridgeModel
from vlbridge.train import distributed


def build_dataset_for(data: DataConfig, model: VLBridgeModel, *, train: bool, features: str | None, where: str) -> Dataset:
    """The dataset for training or for the validation loss.

    Validation is per (image, caption) pair like training, so its loss is comparable, but with the
    deterministic eval transform; `build_dataset(train=False)` would group captions per image.
    """
    if features is not None:
        return _feature_dataset(data, features, model, train=train, where=where)
    preprocess = model.plan.preprocess
    if train or data.format in ("webdataset", "vqa"):
        return build_dataset(data, preprocess, train=train, where=where)
    records = read_records(data, train=True, where=where)
    text = TextOptions(clean=data.clean_text, max_words=data.max_words)
    return RecordDataset(records, eval_transform(preprocess), text=text, strict=data.strict, shuffle=False)


def _feature_dataset(data: DataConfig, features: str, model: VLBridgeModel, *, train: bool, where: str) -> Dataset:
    """Cached encoder outputs instead of images, checked against this model's encoder."""
    try:
        from vlbridge.train import cache_dataset
    except ImportError:
        raise VLBridgeError("data.features: this vlbridge has no frozen-feature cache (vlbridge.train.cache); set features: null") from None
    return cache_dataset.feature_dataset(data, features, train=train, where=where, encoder=model.encoder, assembly=model.assembly)


class BatchStream:
    """Endless micro-batches over epochs, in the seeded order, from a saved position onwards.

    `progress` is this rank's DataProgress: where to resume, and what was skipped so far.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, rank: int, world_size: int,
                 num_workers: int, drop_last: bool, progress: DataProgress | None = None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.drop_last = rank, world_size, num_workers, drop_last
        self.progress = progress or DataProgress(epoch=0)
        self._batches: Iterator[dict[str, Any]] | None = None  # started by the first next(), ended by close()
        self._closed = False

    def loader(self, epoch: int, resume: DataProgress | None = None) -> DataLoader:
        return make_loader(self.dataset, self.batch_size, epoch=epoch, seed=self.seed, rank=self.rank,
                           world_size=self.world_size, num_workers=self.num_workers, resume=resume,
                           drop_last=self.drop_last, pin_memory=torch.cuda.is_available())

    def batches_per_epoch(self) -> int:
        """Micro-batches in a whole epoch on this rank (map-style datasets only)."""
        return len(self.loader(0))

    def __next__(self) -> dict[str, Any]:
        if self._batches is None:
            if self._closed:
                raise VLBridgeError("this BatchStream was closed; to read on from where it stopped, make a new "
                                    "BatchStream with progress=<the closed stream's progress>")
            self._batches = self._iterate()
        return next(self._batches)

    def close(self) -> None:
        """Stop the current epoch's loader now, so its worker processes exit at this known point.

        Left to the garbage collector (the stream and its generator form a cycle), the loader is
        finalised after its queues were: the workers never get the stop signal and torch waits 5 s
        per worker before killing them. `progress` keeps the position for a new stream to resume.
        """
        batches, self._batches, self._closed = self._batches, None, True
        if batches is not None:
            batches.close()  # GeneratorExit at the yield releases the epoch's loader iterator, which stops its workers

    def __iter__(self) -> "BatchStream":
        return self

    def _iterate(self) -> Iterator[dict[str, Any]]:
        resume = self.progress if self.progress.samples or self.progress.streams else None
        while True:
            produced = 0
            for batch in self.loader(self.progress.epoch, resume):
                self.progress.observe(batch)
                produced += 1
                yield batch
            if produced == 0 and resume is None:
                raise DataError(f"epoch {self.progress.epoch} of the training data gave this rank no batch of {self.batch_size} "
                                "samples; lower batch_size, add data, or set drop_last: false")
            resume = None
            self.progress.new_epoch(self.progress.epoch + 1)


def batch_length(batch: Mapping[str, Any]) -> int:
    """Usable samples in a collated batch (skipped ones excluded)."""
    return len(batch["index"])


def lockstep(batches: Iterable[Mapping[str, Any]], world_size: int) -> Iterator[tuple[Mapping[str, Any], bool]]:
    """The usable batches (all-skipped ones dropped), each with whether it counts. Under DDP every
    rank yields as many as the rank with the most, so that an objective's collectives (stage 1
    gathers every rank's batch) meet: a rank that ran out repeats its last batch, not counted.

    Ranks' shares differ (tar shards of unequal sizes, skipped samples): one rank's gather then met
    another's next collective (gloo: 'collective mismatch'; nccl: a hang).
    """
    usable = (batch for batch in batches if batch_length(batch) > 0)
    if world_size == 1:
        yield from ((batch, True) for batch in usable)
        return
    last: Mapping[str, Any] | None = None
    while True:
        batch = next(usable, None)
        last = batch if batch is not None else last
        states = distributed.all_gather_object((batch is not None, last is not None))
        if not any(has for has, _ in states):
            return
        empty = [rank for rank, (_, had) in enumerate(states) if not had]
        if empty:  # every rank sees the same states: all raise, none waits
            raise DataError(f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of {world_size} got no usable "
                            "evaluation sample while others did, and under DDP every rank must join each batch: give "
                            "data.eval enough readable samples (tar shards) for every rank")
        assert last is not None
        yield last, batch is not None


def evaluation_batches(loader: DataLoader, world_size: int) -> Iterator[tuple[Mapping[str, Any], bool]]:
    """`lockstep` over an evaluation loader, without the samples its sampler repeats only to give
    every rank as many (`ResumableSampler.repeats`): each sample then counts once over the ranks, so
    N processes report the metrics one process would. A batch of nothing but repeats still runs
    (the ranks' collectives must meet) and does not count."""
    sampler = loader.sampler
    repeats = sampler.repeats() if isinstance(sampler, ResumableSampler) else frozenset()  # tar shards: disjoint, none
    for batch, counts in lockstep(loader, world_size):
        keep = [int(index) not in repeats for index in batch["index"]]
        if counts and not all(keep):
            batch, counts = (select_items(batch, keep), True) if any(keep) else (batch, False)
        yield batch, counts


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved to `device`; lists, strings and skip records left as they are."""
    move: Callable[[Any], Any] = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return {key: move(value) for key, value in batch.items()}
