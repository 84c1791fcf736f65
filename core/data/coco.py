"""COCO-style caption files: LAVIS's Karpathy lists, the official COCO captions format and
Karpathy's original `dataset_{coco,flickr30k}.json`. Flickr30k ships in the same layouts.

All three become one `ImageText` per (image, caption); `group_captions` gives the per-image view.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlbridge.data.jsonio import optional, read_json, require, require_list, require_text, resolve_image
from vlbridge.data.records import DataError, ImageId, ImageRef, ImageText, two_images

WHAT = "caption file"


def read_coco_captions(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str | None = None
) -> list[ImageText]:
    """Read any of the three layouts; image paths resolve against `image_root` (else the file's folder).

    `split` selects images of Karpathy's original files ("train" includes "restval", as in the
    Karpathy split); the other layouts hold one split per file, so giving it there is an error.
    """
    data = read_json(path, WHAT)
    base = Path(path).expanduser().parent
    if isinstance(data, list):
        layout, records = "LAVIS list", _read_lavis(data, str(path), image_root, base)
    elif isinstance(data, dict) and "annotations" in data:
        layout, records = "official COCO", _read_official(data, str(path), image_root, base)
    elif isinstance(data, dict) and "images" in data:
        return _read_karpathy(data, str(path), image_root, base, split)
    else:
        found = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise DataError(
            f"{WHAT} {str(path)!r}: not a caption file; expected a list of {{image, caption}} records (LAVIS), "
            f"an object with 'images' and 'annotations' (COCO) or with 'images' holding 'sentences' (Karpathy); found {found}"
        )
    if split is not None:
        raise DataError(f"{WHAT} {str(path)!r} ({layout} layout) holds one split and has no per-image split; remove split={split!r}")
    return records


def image_id_from_name(name: str) -> ImageId:
    """The id in a COCO/Flickr file name ("COCO_val2014_000000391895.jpg" -> 391895), else the stem."""
    stem = Path(name).stem
    last = stem.rsplit("_", 1)[-1]
    return int(last) if last.isdigit() else stem


def _read_lavis(data: list[Any], path: str, image_root: str | os.PathLike | None, base: Path) -> list[ImageText]:
    """[{"image", "caption": str | [str], "image_id"?}]: train files per caption, val/test per image."""
    records = []
    for i, item in enumerate(data):
        where = f"{WHAT} {path!r}, record [{i}]"
        image = require(item, "image", str, where)
        captions = require(item, "caption", (str, list), where)
        listed = isinstance(captions, list)
        captions = captions if listed else [captions]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: field 'caption' must be a string or a non-empty list of strings")
        captions = [require_text(item, f"caption[{k}]" if listed else "caption", where, c) for k, c in enumerate(captions)]
        image_id = optional(item, "image_id", (int, str), where, default=None)
        image_id = image_id if image_id is not None else image_id_from_name(image)
        ref = ImageRef(name=image, path=resolve_image(image, image_root, base))
        extra = {k: v for k, v in item.items() if k not in ("image", "caption", "image_id")}
        records.extend(ImageText(ref, caption, image_id, extra) for caption in captions)
    return records


def _read_official(data: dict[str, Any], path: str, image_root: str | os.PathLike | None, base: Path) -> list[ImageText]:
    """{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption", "id"?}]}."""
    images: dict[ImageId, ImageRef] = {}
    for i, item in enumerate(require_list(data, "images", path, WHAT)):
        where = f"{WHAT} {path!r}, images[{i}]"
        image_id = require(item, "id", (int, str), where)
        file_name = require(item, "file_name", str, where)
        if image_id in images and images[image_id].name != file_name:  # its captions would go to one of them unnoticed
            raise two_images(image_id, images[image_id].name, file_name, f"{where}: ")
        images[image_id] = ImageRef(name=file_name, path=resolve_image(file_name, image_root, base))
    records = []
    for i, item in enumerate(require_list(data, "annotations", path, WHAT)):
        where = f"{WHAT} {path!r}, annotations[{i}]"
        image_id = require(item, "image_id", (int, str), where)
        caption = require_text(item, "caption", where)
        if image_id not in images:
            raise DataError(f"{where}: image_id {image_id!r} is not among the file's 'images' ids")
        extra = {"annotation_id": item["id"]} if "id" in item else {}
        records.append(ImageText(images[image_id], caption, image_id, extra))
    return records


def _read_karpathy(
    data: dict[str, Any], path: str, image_root: str | os.PathLike | None, base: Path, split: str | None
) -> list[ImageText]:
    """{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}], "cocoid"?}]}."""
    wanted = {"train", "restval"} if split == "train" else {split}
    records = []
    for i, item in enumerate(require_list(data, "images", path, WHAT)):
        where = f"{WHAT} {path!r}, images[{i}]"
        if split is not None and require(item, "split", str, where) not in wanted:
            continue
        filename = require(item, "filename", str, where)
        name = str(Path(optional(item, "filepath", str, where, default="")) / filename)
        cocoid = optional(item, "cocoid", int, where)
        image_id = cocoid if cocoid is not None else image_id_from_name(filename)
        ref = ImageRef(name=name, path=resolve_image(name, image_root, base))
        for j, sentence in enumerate(require(item, "sentences", list, where)):
            raw = require_text(sentence, "raw", f"{where}.sentences[{j}]")
            records.append(ImageText(ref, raw, image_id, {"split": item.get("split")}))
    if split is not None and not records:
        raise DataError(f"{WHAT} {path!r}: no images with split {split!r}; Karpathy files use train, restval, val and test")
    return records
