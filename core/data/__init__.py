"""vlbridge's data layer: readers for COCO/Flickr30k captions, VQAv2, webdataset tar shards and
JSONL; BLIP-2's image and text transforms; torch datasets, collate and a resumable sample order.

Readers, records, text cleaning and `DataConfig` import no torch; the torch-backed names (datasets,
transforms, loaders) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from vlbridge.data.coco import read_coco_captions
from vlbridge.data.config import DataConfig, load_data_config
from vlbridge.data.jsonl import read_jsonl
from vlbridge.data.records import (
    CaptionGroup,
    DataConfigError,
    DataError,
    ImageQuestion,
    ImageRef,
    ImageText,
    RetrievalTexts,
    Skipped,
    flatten_groups,
    group_captions,
    stable_image_index,
)
from vlbridge.data.shards import expand_shards, iter_shard
from vlbridge.data.text import clean_caption, clean_question
from vlbridge.data.vqa import read_vqa

_LAZY: dict[str, str] = {
    "train_transform": "vlbridge.data.transforms",
    "eval_transform": "vlbridge.data.transforms",
    "open_image": "vlbridge.data.transforms",
    "RecordDataset": "vlbridge.data.datasets",
    "ShardDataset": "vlbridge.data.datasets",
    "TextOptions": "vlbridge.data.datasets",
    "collate": "vlbridge.data.batching",
    "DataProgress": "vlbridge.data.batching",
    "epoch_order": "vlbridge.data.order",
    "ResumableSampler": "vlbridge.data.order",
    "build_dataset": "vlbridge.data.build",
    "read_records": "vlbridge.data.build",
    "make_loader": "vlbridge.data.build",
}

__all__ = [
    "CaptionGroup", "DataConfig", "DataConfigError", "DataError", "ImageQuestion", "ImageRef", "ImageText",
    "RetrievalTexts", "Skipped", "clean_caption", "clean_question", "expand_shards", "flatten_groups",
    "group_captions", "iter_shard", "load_data_config", "read_coco_captions", "read_jsonl", "read_vqa",
    "stable_image_index", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlbridge.data' has no attribute {name!r}")
