"""Sample data files for the data-layer tests (no tests here): small images, a broken one, caption
JSON in each layout, VQAv2 files, JSONL and img2dataset-style tar shards, all written to tmp_path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    buffer = io.BytesIO()
    image(seed, size).save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))
    return path


def write_truncated(path: Path, seed: int = 99) -> Path:
    """A JPEG cut in half: PIL opens the header but fails to load the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(seed, size=(64, 64))
    path.write_bytes(data[: len(data) // 2])
    return path


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard written with the standard library, members in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, seed: int, caption: str | None, *, fmt: str = "jpg", meta: dict | None = None) -> list[tuple[str, bytes]]:
    """img2dataset's members for one sample: KEY.jpg, KEY.txt (unless caption is None), KEY.json."""
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    members = [(f"{key}.{fmt}", image_bytes(seed, pil_format))]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps(meta or {"key": key, "status": "success"}).encode()))
    return members


def coco_karpathy(root: Path, broken: bool = False) -> dict[str, Path]:
    """LAVIS-style COCO Karpathy files: train (one record per caption, string ids) and test (caption lists).

    Three images under root/images/val2014; with `broken`, a fourth that is truncated and a fifth missing.
    """
    names = [f"val2014/COCO_val2014_{n:012d}.jpg" for n in (391895, 522418, 184613)]
    for seed, name in enumerate(names):
        write_image(root / "images" / name, seed)
    train = [
        {"image": names[0], "caption": "A man riding a bike.", "image_id": "coco_391895"},
        {"image": names[0], "caption": "Someone on a bicycle!", "image_id": "coco_391895"},
        {"image": names[1], "caption": "A girl eats (a donut).", "image_id": "coco_522418"},
        {"image": names[2], "caption": "Two dogs: playing.", "image_id": "coco_184613"},
    ]
    if broken:
        write_truncated(root / "images" / "val2014" / "broken.jpg")
        train.append({"image": "val2014/broken.jpg", "caption": "a broken picture", "image_id": "coco_1"})
        train.append({"image": "val2014/missing.jpg", "caption": "a missing picture", "image_id": "coco_2"})
    test = [{"image": names[0], "caption": ["A man riding a bike.", "A cyclist."]},
            {"image": names[1], "caption": ["A girl eats a donut."]}]
    return {
        "train": write_json(root / "coco_karpathy_train.json", train),
        "test": write_json(root / "coco_karpathy_test.json", test),
        "images": root / "images",
    }


def vqa_files(root: Path, with_annotations: bool = True) -> dict[str, Path]:
    """Official VQAv2 questions (+ annotations) for two val2014 images, three questions."""
    for seed, image_id in enumerate((42, 7)):
        write_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", seed)
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the Cat?", "question_id": 420},
        {"image_id": 42, "question": "Is it (really) sleeping?", "question_id": 421},
        {"image_id": 7, "question": "How many dogs?", "question_id": 70},
    ]}
    answers = {420: ["black"] * 9 + ["dark"], 421: ["yes"] * 10, 70: ["2"] * 8 + ["two", "3"]}
    types = {420: ("other", "what color is the"), 421: ("yes/no", "is it"), 70: ("number", "how many")}
    annotations = {"annotations": [
        {"question_id": q, "image_id": 42 if q != 70 else 7, "answer_type": types[q][0], "question_type": types[q][1],
         "multiple_choice_answer": a[0], "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)]}
        for q, a in answers.items()
    ]}
    files = {"questions": write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions), "images": root / "val2014"}
    if with_annotations:
        files["annotations"] = write_json(root / "v2_mscoco_val2014_annotations.json", annotations)
    return files


def shards(root: Path) -> list[Path]:
    """Three img2dataset shards: 7 good samples (jpg/png/webp, one caption only in .json), one
    sample without any text and one whose jpg is corrupt."""
    corrupt = [("000000003.jpg", image_bytes(3)[:40]), ("000000003.txt", b"a corrupt photo")]
    return [
        write_tar(root / "00000.tar", sample_members("000000000", 0, "A red Square.")
                  + sample_members("000000001", 1, "a blue one", fmt="png")
                  + sample_members("000000002", 2, None) + corrupt),
        write_tar(root / "00001.tar", sample_members("000010000", 10, "first of shard one")
                  + sample_members("000010001", 11, None, meta={"caption": "Caption from JSON", "key": "000010001"})
                  + sample_members("000010002", 12, "third", fmt="webp")),
        write_tar(root / "00002.tar", sample_members("000020000", 20, "shard two, one")
                  + sample_members("000020001", 21, "shard two, two")),
    ]
