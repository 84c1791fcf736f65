"""vlbridge.evaluation.readable: find every evaluation image that cannot be read before a model runs.

An evaluation decodes each image inside the model's call. A bad file met there (cut short, not an
image, empty) stopped the run after every earlier batch had run, an hour on a real model, and a rerun
stopped at the next one. So the images are checked first, all of them: a missing file is cheap to see
(the path is wrong, said with where to point `--images`), and every distinct image is decoded once, by
the very decoder the model uses, so the check and the run cannot disagree. That costs one more decode
per image (about 3 ms for a 640x480 JPEG on one core, spread over threads here), little beside a
model's forward passes over it.

Without `skip_unreadable` the bad images are one `UnreadableImagesError` naming them all. With it they
are left out with their records, and `Screening.left_out` says which, for the results to record: a
metric over a subset is not comparable with the whole set's.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

from vlbridge.data import ImageRef
from vlbridge.errors import UnreadableImagesError, VLBridgeError
from vlbridge.files.userfiles import not_a_file

SHOWN = 5  # bad images named in an error or note; the error's `images` and metrics.json's left_out hold all
MISSING_HINT = "Point --images (image_root) at the folder the annotation paths are relative to."
SKIP_HINT = ("pass --skip-unreadable (skip_unreadable=True) to evaluate the readable images only; the results then "
             "record the ids left out, and the metrics are not comparable with the whole set's")
MAX_THREADS = 8  # decoding is I/O and C code that releases the GIL; more threads than this gain little


@dataclass(frozen=True)
class UnreadableImage:
    """An image the evaluation cannot use: the id of its (first) record, its file (an in-memory image's
    name), and why."""

    image_id: Hashable
    name: str
    reason: str


@dataclass(frozen=True)
class Screening:
    """Records whose images all read, the images left out (only with skip_unreadable) and how many
    records went with them (questions, for VQA). Pass it to `run_*` in place of the records, so
    that a caller who checked before loading the model does not decode every image a second time."""

    records: list
    left_out: list[UnreadableImage]
    records_left_out: int = 0

    def note(self, unit: str) -> dict[str, Any] | None:
        """What metrics.json records of the left-out images (None: none were), counted in `unit` too."""
        if not self.left_out:
            return None
        return {"count": len(self.left_out), "image_ids": [image.image_id for image in self.left_out],
                unit: self.records_left_out, "images": [asdict(image) for image in self.left_out]}


def check_images(refs: Sequence[ImageRef], hint: str | None = None) -> None:
    """Fail before running the model when image files are missing; `hint` says what to change."""
    missing = missing_images(refs)
    if missing:
        raise VLBridgeError(f"{len(missing)} image file(s) not found, e.g.\n  {shown_missing(missing)}\n" + (hint or MISSING_HINT))


def missing_images(refs: Iterable[ImageRef]) -> list[str]:
    """The distinct image files among `refs` that are not there to read (in-memory images are)."""
    return sorted({ref.path for ref in refs if ref.path is not None and not Path(ref.path).is_file()})


def shown_missing(missing: Sequence[str], show: int = SHOWN) -> str:
    """The first `show` missing files, one a line, each with what is there instead."""
    return "\n  ".join(f"{path} ({not_a_file(Path(path)).removeprefix('is ')})" for path in missing[:show])


def screen_images(records: Sequence[Any], skip_unreadable: bool = False, hint: str | None = None) -> Screening:
    """Check every image the records (CaptionGroup, ImageText or ImageQuestion) name. Missing files
    are an error at once (`hint`: what to change; default: --images), bad images one error naming
    all of them; with `skip_unreadable` both are left out instead, with their records."""
    records = list(records)
    if not skip_unreadable:
        check_images([r.image for r in records], hint=f"{hint or MISSING_HINT} If these files are gone for good, {SKIP_HINT}.")
    bad = unreadable_images(records)
    if not bad:
        return Screening(records, [])
    if not skip_unreadable:
        raise UnreadableImagesError(unreadable_message(bad, len(_distinct(records))), bad)
    names = {image.name for image in bad}
    kept = [r for r in records if image_key(r.image) not in names]
    if not kept:
        raise VLBridgeError(f"none of the {len(bad)} images can be read, so there is nothing to evaluate:\n  "
                            f"{shown_unreadable(bad)}")
    return Screening(kept, bad, len(records) - len(kept))


def unreadable_images(records: Sequence[Any]) -> list[UnreadableImage]:
    """Every distinct image of the records that is missing or does not decode, in record order."""
    distinct = _distinct(records)
    workers = max(1, min(MAX_THREADS, len(distinct), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(image_problem, [r.image for r in distinct]))
    return [UnreadableImage(r.image_id, image_key(r.image), reason) for r, reason in zip(distinct, reasons) if reason]


def _distinct(records: Sequence[Any]) -> list[Any]:
    """The first record of each distinct image (many VQA questions share one)."""
    first: dict[str, Any] = {}
    for record in records:
        first.setdefault(image_key(record.image), record)
    return list(first.values())


def image_key(ref: ImageRef) -> str:
    """What tells images apart and names one to the user: its file, or an in-memory image's name."""
    return ref.path if ref.path is not None else ref.name


def image_problem(ref: ImageRef) -> str:
    """Why the image cannot be used, as the model would decode it, or "" when it can."""
    from vlbridge.parts.images import decode_image  # torch comes with it; listing what is missing needs none

    try:
        if ref.path is None:
            decode_image(io.BytesIO(ref.data or b""), "the image", len(ref.data or b""))
            return ""
        path = Path(ref.path).expanduser()
        problem = not_a_file(path)
        if problem:
            return f"the file {problem}"
        decode_image(path, "the file", path.stat().st_size)
        return ""
    except VLBridgeError as exc:
        return str(exc)
    except Exception as exc:  # corrupt files raise many types (struct.error, ...): the run would stop on them too
        return f"{type(exc).__name__}: {exc}"


def shown_unreadable(bad: Sequence[UnreadableImage], show: int = SHOWN, indent: str = "  ") -> str:
    """The first `show` bad images, one a line (each after the first starts with `indent`): file,
    image id, reason; then how many more."""
    lines = [f"{image.name} (image id {image.image_id!r}): {image.reason}" for image in bad[:show]]
    if len(bad) > show:
        lines.append(f"... and {len(bad) - show} more")
    return f"\n{indent}".join(lines)


def unreadable_message(bad: Sequence[UnreadableImage], total: int) -> str:
    """The one error for all bad images: how many, the first few, what to do."""
    return (f"{len(bad)} of the {total} images cannot be read (all were checked before the model ran; nothing was "
            f"evaluated):\n  {shown_unreadable(bad)}\nReplace them or remove them from the data, or {SKIP_HINT}.")


def left_out_note(screening: Screening, unit: str, kept: int) -> str:
    """The line the metrics' notes (and the printed table) carry when images were left out."""
    ids = ", ".join(repr(image.image_id) for image in screening.left_out[:SHOWN])
    more = ", ..." if len(screening.left_out) > SHOWN else ""
    return (f"skip_unreadable: {len(screening.left_out)} unreadable image(s) left out (image ids {ids}{more}; all under "
            f"left_out): these metrics cover the other {kept} {unit} only and are not comparable with the whole set's")
