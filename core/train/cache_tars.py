"""Tar samples in a feature cache: the image ids a cache holds them under, wherever their shards are now.

A tar sample's image id is its shard's identity (a local shard's real path) and its key
(`vlbridge.data.shards.tar_image_id`), so equal keys of two shards stay two images. A cache also
records each local shard's size and sha256 (`TarShard`), so a shard moved or renamed since is found
by its content: a shard of the data that the cache does not name is hashed, when a recorded one has
its size, and its samples take the ids of the recorded shard with its sha256. Caches written before
ids escaped the shard hold `SHARD:KEY` as is (`tar_ids: shard:key`); their ids are translated.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence, TypeVar

from vlbridge.data.config import DataConfig
from vlbridge.data.records import ImageText
from vlbridge.data.shards import expand_shards, is_url, shard_identity, split_tar_image_id, tar_image_id
from vlbridge.train.cache import Manifest, TarShard, file_sha256

Sample = TypeVar("Sample")


def is_tar_sample(sample: object) -> bool:
    return isinstance(sample, ImageText) and sample.image.tar_member is not None


def record_tar_shards(configs: Sequence[DataConfig]) -> list[TarShard]:
    """Every local tar shard of the data, with its size and sha256 (one more read of each, beside the
    encoder's pass over its images); piped and URL shards are known by their command or URL alone."""
    recorded: dict[str, TarShard] = {}
    for config in configs:
        if config.format != "webdataset":
            continue
        for shard in (name for entry in config.paths for name in expand_shards(entry) if not is_url(name)):
            identity = shard_identity(shard)
            if identity not in recorded and os.path.isfile(identity):
                recorded[identity] = TarShard(shard=identity, bytes=os.path.getsize(identity), sha256=file_sha256(Path(identity)))
    return list(recorded.values())


def cached_samples(samples: Sequence[Sample], manifest: Manifest) -> tuple[list[Sample], set[int]]:
    """(the samples with the image ids their images have in the cache, the positions of those whose
    shard was found by its content: moved or renamed, its bytes checked, so its stamps do not apply)."""
    if manifest.tar_ids == "shard:key":  # no shards recorded then: ids translated, moved shards not found
        return [dataclasses.replace(s, image_id=":".join(split_tar_image_id(s.image_id))) if is_tar_sample(s) else s
                for s in samples], set()
    named = {recorded.shard for recorded in manifest.tar_shards}
    shards = dict.fromkeys(split_tar_image_id(s.image_id)[0] for s in samples if is_tar_sample(s))
    moved = {shard: found for shard in shards if shard not in named and (found := _same_content(shard, manifest.tar_shards))}
    out, found_by_content = [], set()
    for i, sample in enumerate(samples):
        shard, key = split_tar_image_id(sample.image_id) if moved and is_tar_sample(sample) else (None, "")
        if shard in moved:
            sample = dataclasses.replace(sample, image_id=tar_image_id(moved[shard], key))
            found_by_content.add(i)
        out.append(sample)
    return out, found_by_content


def _same_content(shard: str, recorded: Sequence[TarShard]) -> str | None:
    """The recorded shard whose content a local shard has (hashed only if one has its size), else None."""
    if not os.path.isfile(shard):
        return None
    size = os.path.getsize(shard)
    candidates = [entry for entry in recorded if entry.bytes == size]
    digest = file_sha256(Path(shard)) if candidates else None
    return next((entry.shard for entry in candidates if entry.sha256 == digest), None)
