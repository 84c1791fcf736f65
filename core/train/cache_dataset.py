"""Reading a frozen-feature cache for training: `FeatureDataset` yields the image dataset's item dicts
with `image_embeds` (tokens, width) in place of `pixel_values`, read lazily from memory-mapped shards.

The captions still come from the data config (so cleaning, `max_words` and `limit` apply as usual);
each sample's image is looked up in the cache by its image id, and its name is checked so that a
cache built from other data with clashing ids is refused instead of silently mismatched.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from vlbridge.data.build import read_records
from vlbridge.data.config import DataConfig, load_data_config
from vlbridge.data.datasets import Record, TextOptions, captions_by_image, make_item, one_image_per_file
from vlbridge.data.records import DataError, ImageRef, ImageText, Skipped
from vlbridge.data.shards import expand_shards, iter_shard, shard_identity, split_tar_image_id, tar_image_id
from vlbridge.train.cache import (IMAGE_READING, TENSOR_NAME, CacheError, CacheWarning, ImageId, Manifest, ShardEntry,
                                  file_sha256, file_stamp, read_manifest, rebuild_command, stamp_or_absent, verify_cache)
from vlbridge.train.cache_tars import cached_samples, is_tar_sample

if TYPE_CHECKING:
    from vlbridge.assemblies.assembly import Assembly

_SAFETENSORS_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


# -- records ------------------------------------------------------------------------------------
def portable_name(ref: ImageRef) -> str:
    """An image's name independent of where the data lives: as the annotations write it, or the tar
    member without its shard's path."""
    return ref.tar_member[1] if ref.tar_member is not None else ref.name


def image_place(ref: ImageRef) -> str:
    """Where an image is, whatever the annotations call it: the real path of its file, or its
    shard and member (`shard.tar:key.jpg`, the shard escaped as in its image ids)."""
    if ref.tar_member is not None:
        shard, member = ref.tar_member
        return tar_image_id(shard_identity(shard), member)
    return os.path.realpath(ref.path) if ref.path is not None else ref.name


def stamped_file(ref: ImageRef) -> str | None:
    """The local file whose size and time stand for an image's bytes: the image file, or the tar
    shard holding it (a stream that is no local file: None)."""
    if ref.tar_member is not None:
        shard = ref.tar_member[0]
        return shard if os.path.isfile(shard) else None
    return ref.path


def iter_samples(config: DataConfig, where: str, *, keep_bytes: bool) -> Iterator[Record | Skipped]:
    """Every (image, caption) pair or VQA question of a data config, as the trainer reads them
    (training granularity, `limit` applied); tar samples without image or text come as Skipped."""
    if config.format != "webdataset":
        yield from read_records(config, train=True, where=where)
        return
    for i, entry in enumerate(config.paths):
        try:
            shards = expand_shards(entry)
        except DataError as exc:
            raise DataError(f"{where}.paths[{i}]: {exc}") from exc
        for shard in shards:
            for sample in iter_shard(shard):
                if isinstance(sample, ImageText) and not keep_bytes:  # only the key is needed to find the features
                    sample = dataclasses.replace(sample, image=dataclasses.replace(sample.image, data=b""))
                yield sample


# -- shards -------------------------------------------------------------------------------------
def check_shard(directory: Path, entry: ShardEntry, manifest: Manifest) -> None:
    """A shard exists, has the size the manifest recorded, and holds (rows, tokens, width) in the dtype."""
    path = directory / entry.file
    if not path.is_file():
        raise CacheError(f"feature cache {str(directory)!r}: shard {entry.file} is missing; rebuild the cache "
                         "(vlbridge cache-features --overwrite)")
    size = path.stat().st_size
    if size != entry.bytes:
        raise CacheError(f"feature cache {str(directory)!r}: shard {entry.file} has {size} bytes but the manifest "
                         f"recorded {entry.bytes}: it was truncated or changed; rebuild the cache (--overwrite)")
    expected = ([entry.rows, manifest.encoder.num_tokens, manifest.encoder.width], _SAFETENSORS_DTYPES[manifest.dtype])
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            info = handle.get_slice(TENSOR_NAME)
            found = (list(info.get_shape()), info.get_dtype())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CacheError(f"feature cache {str(directory)!r}: shard {entry.file} cannot be read ({exc}); it is corrupt; "
                         "rebuild the cache (--overwrite)") from None
    if found != expected:
        raise CacheError(f"feature cache {str(directory)!r}: shard {entry.file} holds {found[1]} {found[0]} but the manifest "
                         f"says {expected[1]} {expected[0]}; rebuild the cache (--overwrite)")


class FeatureStore:
    """Row lookup over a cache's shards: image id -> (shard, row); rows read lazily through mmap.

    Open files are per process (they are dropped when the store is pickled into DataLoader workers).
    """

    def __init__(self, directory: str | Path, manifest: Manifest | None = None):
        self.directory = Path(directory).expanduser()
        self.manifest = manifest or read_manifest(self.directory)
        for entry in self.manifest.shards:
            check_shard(self.directory, entry, self.manifest)
        self.rows: dict[ImageId, tuple[int, int, str]] = {}
        for s, entry in enumerate(self.manifest.shards):
            for r, (image_id, name) in enumerate(zip(entry.image_ids, entry.names)):
                self.rows[image_id] = (s, r, name)
        self.skipped = {skip.image_id: skip for skip in self.manifest.skipped}
        self._handles: dict[int, Any] = {}

    def rebuild_command(self) -> str:
        """The cache-features command line that rebuilds this cache where it is."""
        return rebuild_command(self.manifest, directory=self.directory)

    def verify_checksums(self) -> None:
        """Re-hash every shard against the manifest's sha256 (reads the whole cache; opening checks
        only sizes and headers): catches bytes changed in place, e.g. by a bad disk or copy."""
        for entry in self.manifest.shards:
            if file_sha256(self.directory / entry.file) != entry.sha256:
                raise CacheError(f"feature cache {str(self.directory)!r}: shard {entry.file} does not match its sha256 in the "
                                 "manifest: its contents changed; rebuild the cache (--overwrite)")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def row(self, shard: int, row: int) -> torch.Tensor:
        """(tokens, width) features of one image, in the cache's dtype."""
        handle = self._handles.get(shard)
        if handle is None:
            path = self.directory / self.manifest.shards[shard].file
            try:
                handle = self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise CacheError(f"feature cache {str(self.directory)!r}: cannot open {path.name}: {exc}") from None
        return handle.get_slice(TENSOR_NAME)[row]

    def stamp(self, shard: int, row: int) -> list[int] | None:
        """The [size, mtime_ns] the image file had when its features were computed (None: not recorded)."""
        stamps = self.manifest.shards[shard].stamps
        return stamps[row] if stamps is not None else None

    def changed_images(self, samples: list[Record | Skipped], locations: list[tuple[int, int] | None]) -> list[str]:
        """The images whose file now differs in size or modification time from when it was cached:
        its features are another picture's. Files that are gone are not counted (the features stand).
        An image skipped as unreadable (location None) counts when its file differs from then, e.g.
        was fixed or has appeared: training would skip an image that it can read now."""
        changed, seen = [], set()
        for sample, location in zip(samples, locations):
            stamped = None if isinstance(sample, Skipped) else stamped_file(sample.image)
            key = location if location is not None else ("skipped", getattr(sample, "image_id", None))
            if stamped is None or key in seen:
                continue
            seen.add(key)
            if location is None:
                skip = self.skipped.get(sample.image_id)
                if skip is not None and skip.stamp is not None and stamp_or_absent(stamped) != skip.stamp:
                    changed.append(sample.image.name)
                continue
            recorded = self.stamp(*location)
            try:
                if recorded is not None and file_stamp(stamped) != recorded:
                    changed.append(sample.image.name)
            except OSError:
                continue
        return changed

    def locate(self, image_id: ImageId, name: str, *, tar: bool = False) -> tuple[int, int] | None:
        """Where an image's features are; None if it was unreadable at build time; CacheError if absent
        (`tar`: a tar sample's, whose shard may have moved)."""
        found = self.rows.get(image_id)
        if found is None:
            return None if image_id in self.skipped else _raise_missing(self, image_id, name, tar)
        if found[2] != name:
            raise CacheError(f"feature cache {str(self.directory)!r}: image id {image_id!r} is {found[2]!r} in the cache but "
                             f"{name!r} in the data; the cache was built from other data; rebuild it from this data")
        return found[0], found[1]


def _raise_missing(store: FeatureStore, image_id: ImageId, name: str, tar: bool) -> None:
    sources = ", ".join(source.arguments() for source in store.manifest.sources) or "unknown data"
    key = split_tar_image_id(str(image_id))[1]
    moved = [found for found, row in store.rows.items() if tar and isinstance(found, str) and row[2] == name
             and split_tar_image_id(found)[1] == key]
    if moved:  # a tar member of the same name and key under another shard
        why = ("its content (size and sha256) is none of the cached shards' either: it changed since" if store.manifest.tar_shards else
               "this cache was built before vlbridge recorded shards' contents, so it finds shards only where they were")
        raise CacheError(f"feature cache {str(store.directory)!r} has no features for {image_id!r}, but has {moved[0]!r}: tar samples "
                         "are found by shard and key (equal keys of two shards are two images), and a shard moved or renamed since "
                         f"by its content; {why}. Rebuild the cache: {store.rebuild_command()}")
    raise CacheError(f"feature cache {str(store.directory)!r} has no features for image {name!r} (id {image_id!r}); it was "
                     f"built from {sources}. Rebuild it including this data (repeat --data for each dataset, train and eval)")


# -- the dataset --------------------------------------------------------------------------------
class FeatureDataset(Dataset):
    """Map-style dataset of cached features: the items `RecordDataset` gives, with `image_embeds`.

    An image that could not be decoded when the cache was built gives a `Skipped`, as it would when
    reading images (or an error with `strict`). Items come in any order; the DataLoader shuffles.
    """

    def __init__(self, samples: list[Record | Skipped], store: FeatureStore, *, text: TextOptions = TextOptions(),
                 strict: bool = False, shuffle: bool = False):
        if not samples:
            raise DataError("no samples to build a feature dataset from; check the annotation files and the split")
        self.samples, self.store, self.text, self.strict, self.shuffle = samples, store, text, strict, shuffle
        if store.manifest.tar_ids == "key" and any(is_tar_sample(s) for s in samples):
            raise CacheError(f"feature cache {str(store.directory)!r} was built by an earlier vlbridge that found tar samples by key "
                             "alone, so equal keys in two shards (two img2dataset outputs) shared one image's features; tar samples "
                             f"are now found by shard and key. Rebuild it: {store.rebuild_command()}")
        if store.manifest.image_reading != IMAGE_READING:
            warnings.warn(f"feature cache {str(store.directory)!r} was built by an earlier vlbridge, which read images as stored: "
                          "a photo with an EXIF orientation was cached on its side and a transparent pixel as the colour under "
                          "it, where vlbridge now reads them upright and on white; if the data holds such images, rebuild it "
                          f"({store.rebuild_command()})", CacheWarning, stacklevel=2)
        samples, found_by_content = cached_samples(samples, store.manifest)
        self.samples = samples
        self.locations = [None if isinstance(s, Skipped) else store.locate(s.image_id, portable_name(s.image), tar=is_tar_sample(s))
                          for s in samples]
        stamped = [i for i in range(len(samples)) if i not in found_by_content]  # a moved shard's bytes were checked instead
        changed = store.changed_images([samples[i] for i in stamped], [self.locations[i] for i in stamped])
        if changed:
            raise CacheError(f"feature cache {str(store.directory)!r}: {len(changed)} image file(s) changed since their features "
                             f"were computed (size or modification time differs, or a file unreadable or missing then is there now), "
                             f"e.g. {', '.join(repr(n) for n in changed[:3])}; the cache holds the old pictures' features "
                             "(or none). Rebuild the cache from the current images "
                             f"({store.rebuild_command()}); a copy that only changed the times "
                             "needs it too")
        self.same_image = one_image_per_file(samples)
        self.image_captions = captions_by_image(samples, text, self.same_image)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        sample, location = self.samples[index], self.locations[index]
        if isinstance(sample, Skipped):
            return dataclasses.replace(sample, index=index)
        if location is None:
            reason = self.store.skipped[sample.image_id].reason
            if self.strict:
                raise DataError(f"image {sample.image.name!r} (sample {index}) could not be read when the cache was built: {reason}")
            return Skipped(name=sample.image.name, reason=f"unreadable when cached: {reason}", kind="unreadable image", index=index)
        image = self.same_image.get(sample.image_id, sample.image_id)
        item = make_item(sample, self.store.row(*location), index, self.text, self.image_captions.get(image), image)
        item["image_embeds"] = item.pop("pixel_values")
        return item


def feature_dataset(data: DataConfig | dict[str, Any], features: str | Path, *, train: bool, where: str = "data",
                    encoder: torch.nn.Module | None = None, assembly: "Assembly | None" = None) -> FeatureDataset:
    """`data`'s samples over the cache at `features` (the trainer's seam, vlbridge.train.inputs). With
    `assembly` (and its built `encoder`), the cache is first verified against it; the trainer passes both."""
    config = load_data_config(data, where)
    store = FeatureStore(features)
    if assembly is not None:
        verify_cache(store.manifest, assembly, encoder=encoder, directory=features)
    samples = list(iter_samples(config, where, keep_bytes=False))
    text = TextOptions(clean=config.clean_text, max_words=config.max_words)
    shuffle = config.shuffle if config.shuffle is not None else train
    return FeatureDataset(samples, store, text=text, strict=config.strict, shuffle=shuffle)
