"""The record types every reader yields, the error types of the data layer, and stable image indices.

Readers turn files into these plain, picklable records (no torch, no pixels); datasets decode the
image and apply transforms later, in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, Union

from vlbridge.errors import VLBridgeError

ImageId = Union[int, str]


class DataError(VLBridgeError):
    """A data file, record or image that cannot be used as asked; the message names which and why."""


class DataConfigError(DataError):
    """A data config failed validation; every problem carries its YAML path."""

    def __init__(self, where: str, problems: Sequence[str]):
        self.where = where
        self.problems = list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"data config {where} is invalid ({count} problem{'s' if count != 1 else ''}):\n{listed}")


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file path, or bytes already in memory (a tar member).

    `name` is what errors and skip logs show: the path, or `shard.tar:key.jpg`; `tar_member` is a tar
    member's (shard as read, member name), since a ':' in either makes `name` ambiguous.
    """

    name: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    tar_member: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise DataError(f"image {self.name!r}: give exactly one of a path or bytes")


@dataclass(frozen=True)
class ImageText:
    """One (image, caption) pair: a training sample for captioning and stage-1 losses.

    `image_captions`: every caption of its image, where the reader sees them together (a tar sample's
    text members); empty where a dataset gathers them over all its records (`captions_by_image`).
    """

    image: ImageRef
    text: str
    image_id: ImageId
    extra: dict[str, Any] = field(default_factory=dict)
    image_captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageQuestion:
    """One VQA question about an image, with its human answers (empty for a test split)."""

    image: ImageRef
    question: str
    question_id: ImageId
    image_id: ImageId
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    question_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptionGroup:
    """One image with all its captions: the unit of caption evaluation and retrieval."""

    image: ImageRef
    image_id: ImageId
    captions: list[str]


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be used, kept so it can be counted: it travels through collate to the
    training loop, since DataLoader workers cannot update a counter in the main process.

    `kind` is one of SKIP_KINDS; `stream` is (worker key, position) for tar-shard streams.
    """

    name: str
    reason: str
    kind: str = "unreadable image"
    index: int = -1
    stream: tuple[str, int] | None = None


SKIP_KINDS = ("unreadable image", "no image", "no text", "unreadable text", "repeated member", "unreadable tar")


@dataclass(frozen=True)
class RetrievalTexts:
    """Groups flattened for retrieval: every caption in order, and the maps between images and texts."""

    texts: list[str]
    img2txt: list[list[int]]  # image i -> indices of its captions in `texts`
    txt2img: list[int]  # text t -> index of its image


def stable_image_index(image_id: ImageId) -> int:
    """A non-negative int64 for an image id, the same in every worker, rank and run.

    Integer ids are kept; string ids (LAVIS's "coco_328757", tar keys) are hashed, because the
    trainer needs tensors to tell which captions share an image (LAVIS #629 crashed on strings).
    """
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise DataError(f"image id {image_id!r} must be an int or a str, got {type(image_id).__name__}")
    if isinstance(image_id, int):
        if not 0 <= image_id < 2**63:
            raise DataError(f"image id {image_id} is outside 0 .. 2**63 - 1; use a string id instead")
        return image_id
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_file(ref: ImageRef) -> str:
    """Which file an image is, however the annotations spell its path (`a/./b.jpg`, relative or
    absolute); bytes (a tar member, a file of its own in its shard) are known by their name."""
    return os.path.abspath(ref.path) if ref.path is not None else ref.name


def ids_sharing_files(records: Iterable[ImageText]) -> dict[ImageId, ImageId]:
    """Each image id whose file another id also names -> the id that stands for them all (the first
    seen); ids with a file of their own are left out. Stage 1 trains one file as one image, whatever
    ids the data gives it: under two ids its copy would be its own ITC negative and ITM hard negative.

    Ids joined by any shared file are one image (an id naming two files joins both files' ids).
    """
    parent: dict[ImageId, ImageId] = {}  # union-find over ids; a root is its group's first-seen id
    seen: dict[ImageId, int] = {}
    owner: dict[str, ImageId] = {}  # each file's first id

    def root(image_id: ImageId) -> ImageId:
        while parent[image_id] != image_id:
            parent[image_id] = image_id = parent[parent[image_id]]
        return image_id

    for record in records:
        parent.setdefault(record.image_id, record.image_id)
        seen.setdefault(record.image_id, len(seen))
        first, this = root(owner.setdefault(image_file(record.image), record.image_id)), root(record.image_id)
        if first != this:
            keep, join = (first, this) if seen[first] < seen[this] else (this, first)
            parent[join] = keep
    return {image_id: root(image_id) for image_id in parent if root(image_id) != image_id}


def two_images(image_id: ImageId, first: str, second: str, at: str = "", why: str = "") -> DataError:
    """The refusal of an image id that names two image files, in one wording wherever it is found
    (evaluation, training, a COCO file's images list); `why` says what the data would have done."""
    return DataError(f"{at}image id {image_id!r} names two images, {first!r} and {second!r}{why}; "
                     "each image id must belong to one image file")


TRAINED_AS_ONE = (" (training takes an id for one image: each would be the other's ITC positive in stage 1 and never its "
                  "hard negative; give each image file its own image_id)")


def check_one_file_per_id(records: Iterable[Any], source: str = "", why: str = "") -> None:
    """Refuse (image, caption) pairs in which one image id names two image files (however each path
    is spelt, `image_file`); `source` (the files the records came from) starts the error. Ids that
    share one file are another matter (`ids_sharing_files`); VQA questions are not compared (many
    share an image, and no objective compares images)."""
    files: dict[ImageId, ImageRef] = {}
    at = source + ": " if source else ""
    for record in records:
        if isinstance(record, ImageText):
            first = files.setdefault(record.image_id, record.image)
            if image_file(first) != image_file(record.image):
                raise two_images(record.image_id, first.name, record.image.name, at, why)


def group_captions(records: Iterable[ImageText], source: str = "") -> list[CaptionGroup]:
    """Pairs -> one group per image id (first-seen order), for evaluation and retrieval; `source` (the
    files the records came from) starts an error, since the records do not know their file."""
    records = list(records)
    check_one_file_per_id(records, source)
    groups: dict[ImageId, tuple[ImageRef, list[str]]] = {}
    ids: dict[str, ImageId] = {}  # each image file's id: one file under two ids is two "images" that retrieval cannot tell apart
    at = source + ": " if source else ""
    for record in records:
        entry = groups.setdefault(record.image_id, (record.image, []))
        first = ids.setdefault(image_file(record.image), record.image_id)
        if first != record.image_id:
            raise DataError(f"{at}image {record.image.name!r} is given two ids, {first!r} and {record.image_id!r}: evaluated as two "
                            "images with the same pixels, each would be scored against the other's captions too; give it one id")
        entry[1].append(record.text)
    return [CaptionGroup(image, image_id, captions) for image_id, (image, captions) in groups.items()]


def flatten_groups(groups: Sequence[CaptionGroup]) -> RetrievalTexts:
    """Every caption of every group in order, with image->texts and text->image maps (LAVIS's layout)."""
    texts: list[str] = []
    img2txt: list[list[int]] = []
    txt2img: list[int] = []
    for i, group in enumerate(groups):
        img2txt.append(list(range(len(texts), len(texts) + len(group.captions))))
        texts.extend(group.captions)
        txt2img.extend([i] * len(group.captions))
    return RetrievalTexts(texts, img2txt, txt2img)
