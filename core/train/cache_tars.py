"""Tar samples in a feature cache: the image ids a cache holds them under.

A tar sample's image id is its shard's identity and its key (`vlbridge.data.shards.tar_image_id`).
Caches written before that id escaped the shard hold `SHARD:KEY` as is (`tar_ids: shard:key`); they
are the same for a local shard without ':' or '%' in its path, and are read by translating the ids.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

from vlbridge.data.records import ImageText, Skipped
from vlbridge.data.shards import split_tar_image_id
from vlbridge.train.cache import Manifest

Sample = TypeVar("Sample")


def is_tar_sample(sample: object) -> bool:
    return isinstance(sample, ImageText) and sample.image.tar_member is not None


def cached_samples(samples: Sequence[Sample], manifest: Manifest) -> list[Sample]:
    """The samples with the image ids their images have in the cache (the ids the data gives them,
    translated for a cache that wrote them otherwise)."""
    if manifest.tar_ids != "shard:key":
        return list(samples)
    return [dataclasses.replace(s, image_id=":".join(split_tar_image_id(s.image_id))) if is_tar_sample(s) else s
            for s in samples]
