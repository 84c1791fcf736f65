"""From a `DataConfig` to a dataset, and from a dataset to a seeded, resumable DataLoader."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from vlbridge.data.coco import read_coco_captions
from vlbridge.data.batching import DataProgress, collate
from vlbridge.data.config import DataConfig, load_data_config
from vlbridge.data.datasets import Record, RecordDataset, ShardDataset, TextOptions
from vlbridge.data.jsonio import check_file
from vlbridge.data.jsonl import read_jsonl
from vlbridge.data.loader_workers import quiet_when_reader_left
from vlbridge.data.order import ResumableSampler, rng_for
from vlbridge.data.records import TRAINED_AS_ONE, DataError, check_one_file_per_id, group_captions
from vlbridge.data.shards import expand_shards
from vlbridge.data.transforms import eval_transform, train_transform
from vlbridge.data.vqa import read_vqa
from vlbridge.plugin.specs import Preprocess


def build_dataset(
    config: DataConfig | Mapping[str, Any], preprocess: Preprocess, train: bool, *, where: str = "data"
) -> RecordDataset | ShardDataset:
    """The dataset a config describes, with the encoder's train or eval transform.

    Training yields one item per (image, caption); evaluating caption data yields one item per
    image with all its captions. VQA yields one item per question either way. Errors name the
    config's YAML path (`where`) and the offending file.
    """
    config = load_data_config(dict(config) if isinstance(config, Mapping) else config, where)
    transform = train_transform(preprocess) if train else eval_transform(preprocess)
    text = TextOptions(clean=config.clean_text, max_words=config.max_words)
    shuffle = config.shuffle if config.shuffle is not None else train
    if config.format == "webdataset":
        if config.resample and not train:
            raise DataError(f"{where}.resample: a resampled stream never ends and repeats shards; evaluate with resample: false")
        shards = [shard for i, entry in enumerate(config.paths) for shard in _at(f"{where}.paths[{i}]", expand_shards, entry)]
        return ShardDataset(shards, transform, text=text, strict=config.strict, shuffle=shuffle,
                            shuffle_buffer=config.shuffle_buffer, resample=config.resample)
    records = read_records(config, train, where=where)
    return RecordDataset(records, transform, text=text, strict=config.strict, shuffle=shuffle)


def read_records(config: DataConfig, train: bool, *, where: str = "data") -> list[Record]:
    """Every record of a JSON/JSONL config (per caption when training, per image otherwise), up to `limit`."""
    if config.image_root is not None and not Path(config.image_root).expanduser().is_dir():
        raise DataError(f"{where}.image_root: {config.image_root!r} is not a directory")
    records: list[Any] = []
    for i, path in enumerate(config.paths):
        field = f"{where}.paths[{i}]"
        _at(field, check_file, path, {"coco": "caption file", "jsonl": "JSONL file"}.get(config.format, "VQA questions file"))
        if config.format == "coco":
            records.extend(_at(field, read_coco_captions, path, config.image_root, config.split))
        elif config.format == "jsonl":
            records.extend(_at(field, read_jsonl, path, config.image_root))
        else:
            answers = config.vqa_annotations[i] if config.vqa_annotations else None
            if answers is not None:
                _at(f"{where}.vqa_annotations[{i}]", check_file, answers, "VQA annotations file")
            records.extend(_at(field, read_vqa, path, answers, config.image_root, config.split, config.image_pattern))
    source = f"{where}.paths {[str(path) for path in config.paths]}"
    if config.format != "vqa" and not train:
        records = group_captions(records, source)
    elif config.format != "vqa":  # said before any model loads (vlbridge train --check reads here too); RecordDataset checks again
        check_one_file_per_id(records, source, TRAINED_AS_ONE)
    if not records:
        raise DataError(f"{where}.paths: no samples in {config.paths}")
    return records[: config.limit] if config.limit is not None else records


def make_loader(
    dataset: RecordDataset | ShardDataset,
    batch_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    resume: DataProgress | Mapping[str, Any] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader for one epoch of one rank, in the order fixed by (seed, epoch), optionally
    resumed at a saved `DataProgress` of that same epoch. Build a new one each epoch.

    `drop_last` drops each worker's last incomplete batch and, for map-style data, the samples
    that do not split evenly across ranks (otherwise the epoch is padded by repeating its start).
    """
    progress = DataProgress.from_state(resume) if isinstance(resume, Mapping) else resume
    if progress is not None and progress.epoch != epoch:
        raise DataError(f"the resume position is in epoch {progress.epoch}, not {epoch}; pass it only for the epoch it was saved in")
    generator = torch.Generator().manual_seed(int(rng_for(seed, epoch, rank).integers(2**62)))  # worker seeds
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                  generator=generator, multiprocessing_context=_worker_start_method(num_workers),
                  worker_init_fn=quiet_when_reader_left if num_workers > 0 else None)
    if isinstance(dataset, ShardDataset):
        streams, after = (progress.streams, progress.last_stream) if progress else (None, None)
        dataset.configure(epoch=epoch, seed=seed, rank=rank, world_size=world_size, resume=streams, after=after)
        return DataLoader(dataset, **common)
    sampler = ResumableSampler(len(dataset), shuffle=dataset.shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
    sampler.set_epoch(epoch, start=progress.samples if progress else 0)
    return DataLoader(dataset, sampler=sampler, **common)


def _worker_start_method(num_workers: int) -> str | None:
    """How loader workers start: forked on Linux, whoever started this process.

    A process that was itself spawned (`vlbridge compare`'s workers) spawns by default, and a spawned
    loader worker imports torch and vlbridge and then exits a whole interpreter: seconds for every
    epoch's loader. Elsewhere torch's default stands (macOS spawns, as fork is unsafe there).
    """
    return "fork" if num_workers > 0 and sys.platform.startswith("linux") else None


def _at(field: str, function: Any, *args: Any) -> Any:
    """Call a reader; its DataError is re-raised with the config field it came from."""
    try:
        return function(*args)
    except DataError as exc:
        raise DataError(f"{field}: {exc}") from exc
