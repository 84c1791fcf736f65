"""Writing the world to disk in the formats the real readers take.

    OUT/manifest.json                   config, statistics, file names, the VQA image pattern
    OUT/images/world_{split}_{id:07d}.png
    OUT/captions_{split}.json           LAVIS/Karpathy list: [{image, caption: [...], image_id}]
    OUT/questions_{split}.json          VQAv2 questions (data_subtype = split)
    OUT/annotations_{split}.json        VQAv2 annotations: 10 answers per question
    OUT/scenes_{split}.json             the scene of every image (what every answer derives from)

`read_coco_captions(OUT/captions_val.json)` and `read_vqa(OUT/questions_val.json,
OUT/annotations_val.json, image_pattern=IMAGE_PATTERN)` read it back.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlbridge.files.atomic import atomic_write_text
from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json
from vlbridge.world.config import ID_OFFSETS, SPLITS, WorldConfig
from vlbridge.world.language import QA, captions, questions
from vlbridge.world.render import render_scene
from vlbridge.world.scene import Scene, sample_scene

IMAGE_PATTERN = "images/world_{split}_{image_id:07d}.png"  # for read_vqa's image_pattern
MANIFEST = "manifest.json"
INCOMPLETE = "incomplete"  # the manifest's flag while a world is being written: not a world to read
FORMAT_VERSION = 1
ANSWERS_PER_QUESTION = 10  # as VQAv2


@dataclass(frozen=True)
class WorldImage:
    """Everything about one image except its pixels."""

    scene: Scene
    captions: list[str]
    qas: list[QA]

    @property
    def file_name(self) -> str:
        return IMAGE_PATTERN.format(split=self.scene.split, image_id=self.scene.image_id)


def make_image(config: WorldConfig, split: str, index: int) -> WorldImage:
    """Image `index` of a split (also the frozen parts' "pretrain" stream): scene, captions, questions."""
    if split not in ID_OFFSETS:
        raise VLBridgeError(f"unknown world split {split!r}; choose from {sorted(ID_OFFSETS)}")
    rng = config.image_rng(split, index)
    allowed = config.allowed(split)
    required = rng.choice(config.held_out) if split == "comp" else None
    count = rng.randint(config.min_objects, config.max_objects)
    scene = sample_scene(rng, ID_OFFSETS[split] + index + 1, split, count, allowed, required, config.duplicate_prob)
    return WorldImage(scene, captions(scene, config.captions_per_image, rng), questions(scene, config.questions_per_image, rng, allowed))


def generate_world(out: str | Path, config: WorldConfig | None = None) -> dict[str, Any]:
    """Write every split of the world under `out`; return the manifest (also in OUT/manifest.json).

    `out` must be empty, missing, or a world written before. There a split sized 0 that the old
    world has images of is kept as it is (its scenes depend only on the seed, split and index, so
    it still belongs to the same world); every other split is replaced. The manifest's "kept" names
    the kept splits, and its config and stats describe the whole folder.
    """
    config = config or WorldConfig()
    out = Path(out)
    previous = _previous_world(out)
    kept = _kept_splits(out, config, previous)
    config = config.model_copy(update={split: previous["config"][split] for split in kept})
    regenerated = [split for split in SPLITS if split not in kept]
    stats: dict[str, Any] = {split: previous["stats"][split] for split in kept}
    _prepare(out, regenerated, _manifest(config, stats, kept))
    for split in regenerated:
        images = [make_image(config, split, i) for i in range(config.size(split))]
        for image in images:
            render_scene(image.scene, config.image_size).save(out / image.file_name, format="PNG")
        _write_split(out, split, images, config)
        stats[split] = split_stats(images, config)
    manifest = _manifest(config, stats, kept)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _manifest(config: WorldConfig, stats: dict[str, Any], kept: list[str]) -> dict[str, Any]:
    """The world's manifest: its stats list the splits written so far (all of them once it is done)."""
    return {
        "format_version": FORMAT_VERSION, "config": config.model_dump(mode="json"), "image_pattern": IMAGE_PATTERN,
        "files": {split: split_files(split) for split in SPLITS}, "stats": {split: stats[split] for split in SPLITS if split in stats},
        "kept": kept,
    }


def split_files(split: str) -> dict[str, str]:
    """File names of a split, relative to the world's folder."""
    return {kind: f"{kind}_{split}.json" for kind in ("captions", "questions", "annotations", "scenes")}


def _previous_world(out: Path) -> dict[str, Any] | None:
    """The manifest of the world already in `out`; None for a new or empty folder; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise VLBridgeError(f"world output {str(out)!r} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    manifest_file = out / MANIFEST
    if not manifest_file.is_file():
        raise VLBridgeError(f"world output {str(out)!r} is not empty and holds no world ({MANIFEST}); give an empty or new folder")
    manifest = read_json(manifest_file, "world manifest", top=dict)
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("stats"), dict):
        raise VLBridgeError(f"{manifest_file} is not a world manifest (no config and stats); give an empty or new folder")
    return manifest


def _kept_splits(out: Path, config: WorldConfig, previous: dict[str, Any] | None) -> list[str]:
    """Splits sized 0 now whose images the previous world holds; refused where its other settings differ."""
    if previous is None:
        return []
    old = previous["config"]
    kept = [split for split in SPLITS if not config.size(split) and old.get(split) and split in previous["stats"]]
    new = config.model_dump(mode="json")
    changed = [key for key in new if key not in SPLITS and old.get(key) != new[key]]
    if kept and changed:
        settings = ", ".join(f"{key} {old.get(key)} -> {key} {new[key]}" for key in changed)
        counts = ", ".join(f"{split} {old[split]}" for split in kept)
        raise VLBridgeError(
            f"{str(out)!r} holds a world whose {', '.join(kept)} splits ({counts} images) this call would not regenerate (size 0), "
            f"but its settings differ ({settings}): kept, they would belong to another world. Give every split a size to "
            f"replace the whole world (e.g. --{kept[0]} {old[kept[0]]}), or write to another folder")
    return kept


def _prepare(out: Path, splits: list[str], interim: dict[str, Any]) -> None:
    """Create `out` and remove the files of the splits about to be written (a previous world's).

    First the manifest becomes `interim` (the kept splits only) flagged incomplete: a call cut
    short leaves a folder that the next call takes up and that no reader takes for a world."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps({**interim, INCOMPLETE: True}, indent=1))
    for split in splits:
        for image in (out / "images").glob(f"world_{split}_*.png"):
            image.unlink()
        for name in split_files(split).values():
            (out / name).unlink(missing_ok=True)


def _write_split(out: Path, split: str, images: list[WorldImage], config: WorldConfig) -> None:
    files = split_files(split)
    caption_records = [{"image": im.file_name, "caption": im.captions, "image_id": im.scene.image_id} for im in images]
    question_records, annotation_records = [], []
    for im in images:
        for k, qa in enumerate(im.qas):
            question_id = im.scene.image_id * 10 + k
            question_records.append({"image_id": im.scene.image_id, "question": qa.question, "question_id": question_id})
            annotation_records.append(vqa_annotation(qa, question_id, im.scene.image_id, config.synonym_answers))
    questions_file = {"info": {"description": "vlbridge world", "seed": config.seed}, "task_type": "Open-Ended",
                      "data_type": "world", "data_subtype": split, "license": {"name": "public domain"}, "questions": question_records}
    annotations_file = {"info": questions_file["info"], "data_type": "world", "data_subtype": split, "annotations": annotation_records}
    scenes_file = [im.scene.to_dict() for im in images]
    for kind, data in (("captions", caption_records), ("questions", questions_file), ("annotations", annotations_file), ("scenes", scenes_file)):
        atomic_write_text(out / files[kind], json.dumps(data))


def vqa_annotation(qa: QA, question_id: int, image_id: int, synonyms: int) -> dict[str, Any]:
    """VQAv2's annotation record: 10 answers, the last `synonyms` of them the synonym if there is one."""
    texts = [qa.answer] * ANSWERS_PER_QUESTION
    if qa.synonym and synonyms:
        texts[ANSWERS_PER_QUESTION - synonyms:] = [qa.synonym] * synonyms
    return {
        "question_id": question_id, "image_id": image_id, "question_type": qa.question_type, "answer_type": qa.answer_type,
        "multiple_choice_answer": qa.answer, "category": qa.category,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(texts)],
    }


def split_stats(images: list[WorldImage], config: WorldConfig) -> dict[str, Any]:
    """Counts that say what a split holds: objects per image, question kinds, yes share, held-out objects."""
    qas = [qa for im in images for qa in im.qas]
    objects = [o for im in images for o in im.scene.objects]
    yes_no = [qa for qa in qas if qa.answer_type == "yes/no"]
    held = set(config.held_out)
    return {
        "images": len(images), "captions": sum(len(im.captions) for im in images), "questions": len(qas),
        # str keys: the manifest returned equals the one read back from JSON (kept splits come from there)
        "objects_per_image": {str(n): k for n, k in sorted(Counter(len(im.scene.objects) for im in images).items())},
        "question_kinds": dict(sorted(Counter(qa.category for qa in qas).items())),
        "answer_types": dict(sorted(Counter(qa.answer_type for qa in qas).items())),
        "yes_share": round(sum(qa.answer == "yes" for qa in yes_no) / len(yes_no), 3) if yes_no else None,
        "distinct_answers": len({qa.answer for qa in qas}),
        "held_out_objects": sum(o.pair in held for o in objects),
    }
