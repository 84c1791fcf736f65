"""VQAv2: the official questions file plus an optional annotations file (none for test splits),
or LAVIS's flattened list ({question_id, question, answer: [...], image}).

Official files name no image path; the image is `image_pattern` filled with the split (the data
subtype, e.g. "val2014", read from the questions file unless given) and the image id.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

from vlbridge.data.coco import image_id_from_name  # the same file-name rule as caption files
from vlbridge.data.jsonio import optional, read_json, require, require_list, require_text, resolve_image
from vlbridge.data.records import DataError, ImageId, ImageQuestion, ImageRef

DEFAULT_IMAGE_PATTERN = "COCO_{split}_{image_id:012d}.jpg"
QUESTIONS, ANNOTATIONS = "VQA questions file", "VQA annotations file"


def read_vqa(
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
) -> list[ImageQuestion]:
    """One ImageQuestion per question; answers come from `annotations` (empty without one)."""
    data = read_json(questions, QUESTIONS)
    base = Path(questions).expanduser().parent
    if isinstance(data, list):
        if annotations is not None:
            raise DataError(f"{QUESTIONS} {str(questions)!r} is a LAVIS list, which carries its answers; remove the annotations file")
        return _read_lavis(data, str(questions), image_root, base)
    items = require_list(data, "questions", questions, QUESTIONS)
    split = split if split is not None else data.get("data_subtype")
    check_pattern(image_pattern, split, str(questions))
    answers = _read_annotations(annotations) if annotations is not None else None
    root = image_root if image_root is not None else base
    records, missing = [], []
    seen: dict[ImageId, int] = {}
    for i, item in enumerate(items):
        where = f"{QUESTIONS} {str(questions)!r}, questions[{i}]"
        image_id = require(item, "image_id", (int, str), where)
        question_id = require(item, "question_id", (int, str), where)
        question = require_text(item, "question", where)
        if question_id in seen:  # results files and scores are keyed by question_id: one of the two would be lost
            raise DataError(f"{where}: question_id {question_id!r} is already questions[{seen[question_id]}]; "
                            "each question needs its own id")
        seen[question_id] = i
        image = _image_name(image_pattern, split, image_id, where)
        ann = answers.get(question_id) if answers is not None else {}
        if ann is None:
            missing.append(question_id)
            continue
        ref = ImageRef(name=image, path=resolve_image(image, root, base))
        records.append(_record(ref, question, question_id, image_id, ann))
    if missing:
        shown = ", ".join(map(str, missing[:5]))
        raise DataError(
            f"{ANNOTATIONS} {str(annotations)!r} has no answers for {len(missing)} of {len(items)} questions in "
            f"{str(questions)!r} (question_id {shown}{', ...' if len(missing) > 5 else ''}); are both files of the same split?"
        )
    return records


def check_pattern(pattern: str, split: str | None, source: str) -> None:
    """The pattern may use {split} and {image_id} only, and {split} needs a known split."""
    fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    unknown = sorted(fields - {"split", "image_id"})
    if unknown or "image_id" not in fields:
        raise DataError(f"image_pattern {pattern!r} must use {{image_id}} and may use {{split}}; unknown: {unknown or 'none'}")
    if "split" in fields and split is None:
        raise DataError(
            f"{QUESTIONS} {source!r} has no 'data_subtype' and no split was given; set split to the image "
            f"folder's subtype (e.g. 'val2014', 'test2015') or an image_pattern without {{split}}"
        )


def _image_name(pattern: str, split: str | None, image_id: ImageId, where: str) -> str:
    try:
        return pattern.format(split=split, image_id=image_id)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: image_pattern {pattern!r} cannot format image_id {image_id!r}: {exc}") from exc


def _read_annotations(path: str | os.PathLike) -> dict[ImageId, dict[str, Any]]:
    data = read_json(path, ANNOTATIONS)
    by_question: dict[ImageId, dict[str, Any]] = {}
    for i, item in enumerate(require_list(data, "annotations", path, ANNOTATIONS)):
        where = f"{ANNOTATIONS} {str(path)!r}, annotations[{i}]"
        question_id = require(item, "question_id", (int, str), where)
        answers = require(item, "answers", list, where)
        texts = [require(a, "answer", str, f"{where}.answers[{j}]") for j, a in enumerate(answers)]
        if question_id in by_question:  # silently keeping one would score against the wrong answers
            raise DataError(f"{where}: question_id {question_id!r} already has answers in {by_question[question_id]['where']}; "
                            "each question needs one annotation (two files of one split joined twice?)")
        by_question[question_id] = {
            "answers": texts,
            "image_id": optional(item, "image_id", (int, str), where),
            "answer_type": optional(item, "answer_type", str, where),
            "question_type": optional(item, "question_type", str, where),
            "multiple_choice_answer": optional(item, "multiple_choice_answer", str, where),
            "where": where,
        }
    return by_question


def _record(ref: ImageRef, question: str, question_id: ImageId, image_id: ImageId, ann: dict[str, Any]) -> ImageQuestion:
    if ann.get("image_id") is not None and ann["image_id"] != image_id:
        raise DataError(f"{ann['where']}: image_id {ann['image_id']!r} differs from the question's image_id {image_id!r}")
    extra = {"multiple_choice_answer": ann["multiple_choice_answer"]} if ann.get("multiple_choice_answer") else {}
    return ImageQuestion(
        image=ref, question=question, question_id=question_id, image_id=image_id, answers=list(ann.get("answers", [])),
        answer_type=ann.get("answer_type"), question_type=ann.get("question_type"), extra=extra,
    )


def _read_lavis(data: list[Any], path: str, image_root: str | os.PathLike | None, base: Path) -> list[ImageQuestion]:
    """LAVIS's vqa_{train,val}.json: the image path is in the record, answers are a list (or absent)."""
    records = []
    for i, item in enumerate(data):
        where = f"{QUESTIONS} {path!r}, record [{i}]"
        image = require(item, "image", str, where)
        answers = optional(item, "answer", (str, list), where, default=[])
        answers = [answers] if isinstance(answers, str) else answers
        if not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answer' must be a string or a list of strings")
        ref = ImageRef(name=image, path=resolve_image(image, image_root, base))
        records.append(ImageQuestion(
            image=ref, question=require_text(item, "question", where),
            question_id=require(item, "question_id", (int, str), where),
            image_id=optional(item, "image_id", (int, str), where, default=image_id_from_name(image)), answers=answers,
        ))
    return records
