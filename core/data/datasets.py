"""Torch datasets over records: map-style for JSON/JSONL readers, iterable for tar-shard streams.

Items are dicts: `pixel_values` (transformed), `image_id` (as in the data, int or str),
`image_index` (its stable int, see `stable_image_index`; ids naming one image file share the first
id's, `one_image_per_file`), `index`, and by record type `text`
(a pair, with `image_captions`: every caption the data gives its image, which stage 1's
`positives: caption` reads; a tar stream knows those of the pair's own sample, its text members),
`captions` (a per-image group) or `question` + `answers` + ids and types (VQA). An image
that cannot be decoded gives a `Skipped` instead, which `collate` drops and counts; with
`strict=True` it is a DataError naming the file.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlbridge.data.order import assign_shards, buffer_shuffle, rng_for
from vlbridge.data.records import (TRAINED_AS_ONE, CaptionGroup, DataError, ImageId, ImageQuestion, ImageRef, ImageText, Skipped,
                                   check_one_file_per_id, ids_sharing_files, image_file, stable_image_index)
from vlbridge.data.shards import expand_shards, iter_shard
from vlbridge.data.text import clean_caption, clean_question
from vlbridge.data.transforms import open_image
from vlbridge.errors import DataWarning, VLBridgeError

Record = Union[ImageText, CaptionGroup, ImageQuestion]
Transform = Callable[[Image.Image], torch.Tensor]
Item = Union[dict[str, Any], Skipped]


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """How texts are prepared: BLIP's cleaning (or none) and the word cap."""

    clean: bool = True
    max_words: int = 50

    def caption(self, text: str) -> str:
        return clean_caption(text, self.max_words) if self.clean else first_words(text, self.max_words)

    def question(self, text: str) -> str:
        return clean_question(text, self.max_words) if self.clean else first_words(text, self.max_words)


def first_words(text: str, max_words: int) -> str:
    """`text` as it is, or its first `max_words` words where it has more: the cap holds without the
    cleaning too (`clean_text: false` turned it off with the cleaning)."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def load_pixels(ref: ImageRef, transform: Transform, strict: bool, index: int) -> torch.Tensor | Skipped:
    """Decode and transform one image; a failure is a Skipped, or an error when strict."""
    try:
        return transform(open_image(ref))
    except Exception as exc:  # corrupt files raise many types (OSError, SyntaxError, struct.error...)
        if strict and isinstance(exc, VLBridgeError):  # already names the file (vlbridge.parts.images, open_image)
            raise exc if isinstance(exc, DataError) else DataError(str(exc)) from exc
        if strict:
            raise DataError(f"image {ref.name!r} (sample {index}) cannot be used: {type(exc).__name__}: {exc}") from exc
        return Skipped(name=ref.path or ref.name, reason=f"{type(exc).__name__}: {exc}", kind="unreadable image", index=index)


PAIR_KEYS = ("text_input", "text_output")


def distinct_captions(captions: Iterable[str], text: TextOptions) -> tuple[str, ...]:
    """The captions cleaned, each once, in order of appearance."""
    return tuple(dict.fromkeys(text.caption(caption) for caption in captions))


def one_image_per_file(records: Sequence[Any]) -> dict[ImageId, ImageId]:
    """`ids_sharing_files` of the (image, caption) pairs, said once as a DataWarning with how many ids
    share a file and an example: stage 1 then trains each such file as one image, which the user may
    not have meant. VQA questions are left as they are: no objective compares their images."""
    pairs = [record for record in records if isinstance(record, ImageText)]
    same = ids_sharing_files(pairs)
    if same:
        ids_of: dict[str, tuple[str, dict[ImageId, None]]] = {}  # file -> (its name as written, its ids)
        for record in pairs:
            ids_of.setdefault(image_file(record.image), (record.image.name, {}))[1][record.image_id] = None
        name, ids = next((name, list(ids)) for name, ids in ids_of.values() if len(ids) > 1)
        warnings.warn(f"{len(same)} image id(s) name an image file that another id names too (e.g. {name!r} is listed under ids "
                      f"{ids[0]!r} and {ids[1]!r}): each such file trains as one image, its captions positives of each other in "
                      "stage 1 and never each other's hard negatives; give each image file one id to silence this",
                      DataWarning, stacklevel=3)
    return same


def captions_by_image(records: Sequence[Any], text: TextOptions,
                      same: Mapping[ImageId, ImageId] | None = None) -> dict[Any, tuple[str, ...]]:
    """Every (cleaned, distinct) caption the pairs give each image (its id, or the id `same` maps it to:
    `one_image_per_file`), in order of appearance."""
    same = same or {}
    found: dict[Any, list[str]] = {}
    for record in records:
        if isinstance(record, ImageText):
            found.setdefault(same.get(record.image_id, record.image_id), []).append(record.text)
    return {image_id: distinct_captions(captions, text) for image_id, captions in found.items()}


def make_item(record: Record, pixels: torch.Tensor, index: int, text: TextOptions,
              image_captions: tuple[str, ...] | None = None, image: ImageId | None = None) -> dict[str, Any]:
    """The item dict for one decoded record; a pair's `image_captions` default to those its record
    carries (a tar sample's), else its own text. `image`: the id whose index the record's image
    takes (another id naming the same file: `one_image_per_file`), else its own."""
    item: dict[str, Any] = {
        "pixel_values": pixels, "image_id": record.image_id,
        "image_index": stable_image_index(record.image_id if image is None else image), "index": index,
    }
    if isinstance(record, ImageText):
        item["text"] = text.caption(record.text)
        item["image_captions"] = image_captions or distinct_captions(record.image_captions, text) or (item["text"],)
        pair = {key: record.extra.get(key) for key in PAIR_KEYS}
        if all(isinstance(value, str) for value in pair.values()):  # an explicit (input, target) pair for stage 2
            item.update(pair)
    elif isinstance(record, CaptionGroup):
        item["captions"] = [text.caption(c) for c in record.captions]
    else:
        item.update(
            question=text.question(record.question), answers=list(record.answers), question_id=record.question_id,
            answer_type=record.answer_type, question_type=record.question_type,
        )
    return item


class RecordDataset(Dataset):
    """Map-style dataset over records read from JSON or JSONL; decoding happens per item, in workers."""

    def __init__(
        self, records: Sequence[Record], transform: Transform, *, text: TextOptions = TextOptions(), strict: bool = False, shuffle: bool = False
    ):
        if not records:
            raise DataError("no samples to build a dataset from; check the annotation files and the split")
        self.records = list(records)
        for record in self.records:
            stable_image_index(record.image_id)  # reject unusable ids now, not in a worker mid-epoch
        check_one_file_per_id(self.records, why=TRAINED_AS_ONE)  # its image_index would make two pictures one
        self.transform, self.text, self.strict, self.shuffle = transform, text, strict, shuffle
        self.same_image = one_image_per_file(self.records)
        self.image_captions = captions_by_image(self.records, text, self.same_image)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Item:
        record = self.records[index]
        pixels = load_pixels(record.image, self.transform, self.strict, index)
        if isinstance(pixels, Skipped):
            return pixels
        image = self.same_image.get(record.image_id, record.image_id)
        return make_item(record, pixels, index, self.text, self.image_captions.get(image), image)


class ShardDataset(IterableDataset):
    """Streams tar shards: shards split across ranks, then DataLoader workers; shuffled per epoch.

    Each worker plays one stream ("role") of the epoch; items carry `stream` = (role key, position).
    `configure(resume={key: position}, after=key)` re-reads each stream, skips what was consumed
    before decoding, and rotates roles so that the stream after `after` comes first, as it would
    have in the interrupted run. The worker count must match the run that saved the positions.

    `resample=True` replaces the split of the shard list by webdataset's `ResampledShards`: each
    stream draws shards with replacement, without end, from an rng fixed by (seed, epoch, rank,
    role), so a stream is still a function of those alone and resumes exactly the same way.
    """

    def __init__(
        self, shards: str | Sequence[str], transform: Transform, *, text: TextOptions = TextOptions(),
        strict: bool = False, shuffle: bool = False, shuffle_buffer: int = 1000, resample: bool = False,
    ):
        self.shards = expand_shards(shards)
        self.transform, self.text, self.strict = transform, text, strict
        self.shuffle, self.shuffle_buffer, self.resample = shuffle, shuffle_buffer, resample
        self.configure()

    def configure(
        self, *, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
        resume: Mapping[str, int] | None = None, after: str | None = None,
    ) -> None:
        """Set the epoch, seed, this process's rank and the resume point; call before iterating."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0 .. world_size - 1 = {world_size - 1}")
        if len(self.shards) < world_size and not self.resample:  # found here, in the main process, rather than in a worker
            raise DataError(f"{len(self.shards)} shards for {world_size} ranks: every rank needs at least one shard")
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.resume, self.after = dict(resume or {}), after

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self._rotation(workers)) % workers
        key = stream_key(role, workers)
        shards = resampled_shards(self.shards, rng_for(self.seed, self.epoch, self.rank, role)) if self.resample else assign_shards(
            self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
            rank=self.rank, world_size=self.world_size, worker=role, num_workers=workers,
        )
        samples = (sample for shard in shards for sample in iter_shard(shard))
        buffer = self.shuffle_buffer if self.shuffle else 0
        stream = buffer_shuffle(samples, buffer, rng_for(self.seed, self.epoch, self.rank, role))
        skip, streams, slot = self.resume.get(key, 0), self.world_size * workers, self.rank * workers + role
        for position, sample in enumerate(stream, start=1):
            if position > skip:
                yield self._item(sample, (position - 1) * streams + slot, (key, position))

    def _item(self, sample: ImageText | Skipped, index: int, stream: tuple[str, int]) -> Item:
        if isinstance(sample, ImageText):
            pixels = load_pixels(sample.image, self.transform, self.strict, index)
            if not isinstance(pixels, Skipped):
                return {**make_item(sample, pixels, index, self.text), "stream": stream}
            sample = pixels
        if self.strict:
            raise DataError(f"{sample.name}: {sample.reason}")
        return dataclasses.replace(sample, index=index, stream=stream)

    def _rotation(self, workers: int) -> int:
        """Which role worker 0 plays: the one after `after`; checks the saved worker count."""
        keys = sorted({*self.resume, *([self.after] if self.after else [])})
        stale = [k for k in keys if not k.endswith(f"/{workers}")]
        if stale:
            raise DataError(
                f"resume positions {stale} were saved with a different number of DataLoader workers than {workers}; "
                "resume with the same num_workers, or start the epoch over"
            )
        return (int(self.after.split("/")[0]) + 1) % workers if self.after else 0


def resampled_shards(shards: Sequence[str], rng: np.random.Generator) -> Iterator[str]:
    """An endless draw of shards with replacement (webdataset's ResampledShards), seeded by `rng` alone.

    deterministic=True with a constant worker seed: the draw must not depend on the process id,
    the clock, or torch's worker info, only on the (seed, epoch, rank, role) behind `rng`.
    """
    from webdataset import ResampledShards

    seed = int(rng.integers(2**31))
    for source in ResampledShards(list(shards), seed=seed, worker_seed=lambda: 0, deterministic=True):
        yield source["url"]


def stream_key(worker: int, num_workers: int) -> str:
    """The key of one worker's stream in resume positions: "worker/num_workers"."""
    return f"{worker}/{num_workers}"
