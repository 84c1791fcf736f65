"""Plain JSONL pairs: one {"image": path, "text": str, "image_id"?: int | str} object per line.

A line may add "text_input" and "text_output" (both strings): stage 2 then reads prompt +
text_input as the LLM's input and learns only text_output (VQA-style instruction data).

The simplest way to bring your own data. Relative image paths resolve against the image root, or
else the JSONL file's folder, so a folder of images with its JSONL can be moved as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlbridge.data.jsonio import iter_jsonl, optional, require, resolve_image
from vlbridge.data.records import DataError, ImageRef, ImageText

WHAT = "JSONL file"


def read_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[ImageText]:
    """One ImageText per line; without an "image_id" the image path as written is the id."""
    base = Path(path).expanduser().parent
    records = []
    for line, item in iter_jsonl(path, WHAT):
        where = f"{WHAT} {str(path)!r}, line {line}"
        image = require(item, "image", str, where)
        text = require(item, "text", str, where)
        if not text.strip() and not isinstance(item.get("text_output"), str):
            raise DataError(f"{where}: field 'text' is empty; give the image's caption, or drop the line")
        image_id = optional(item, "image_id", (int, str), where, default=image)
        extra = {k: v for k, v in item.items() if k not in ("image", "text", "image_id")}
        records.append(ImageText(ImageRef(name=image, path=resolve_image(image, image_root, base)), text, image_id, extra))
    return records
