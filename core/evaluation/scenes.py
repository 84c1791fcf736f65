"""Scene-level correctness for retrieval on a generated world: a caption is right for every image of
an identical scene, not only for the one it was written for. `vlbridge compare` scores the world's
retrieval so, and `vlbridge eval --scenes` can too; without a scenes file each image is its own.

A generated world draws scenes at random, so two images can hold the same objects with the same
sizes, colours, shapes and grid cells (only the jitter inside a cell differs, which no caption
states): their "scene" captions are then the same sentence, and ranking one above the other is a
coin toss that BLIP-2's rule (own captions only) would count as a miss."""

from __future__ import annotations

import json
from typing import Any, Hashable, Sequence

from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json

SCENE_RULE = ("a retrieved caption counts as right when it is true of the query image: written for it or for an image "
              "of an identical scene (same objects, sizes, colours, shapes and cells; only the jitter inside a cell differs)")
JITTER_FIELDS = ("dx", "dy")  # an object's offset inside its cell: no caption states it


def scene_keys(groups: Sequence[Any], scenes_file: str | None) -> list[Hashable]:
    """One key per image (caption group): identical scenes share it (jitter inside a cell ignored:
    no caption can tell it); without scenes, every image is its own."""
    if not scenes_file:
        return [g.image_id for g in groups]
    scenes = read_scenes(scenes_file)
    missing = [g.image_id for g in groups if g.image_id not in scenes]
    if missing:
        raise VLBridgeError(f"{scenes_file}: no scene for {len(missing)} evaluated image(s), e.g. {missing[:3]}")
    return [tuple(sorted(_described(o) for o in scenes[g.image_id])) for g in groups]


def read_scenes(scenes_file: str) -> dict[Any, list[dict[str, Any]]]:
    """Each image id's objects, from a generated world's scenes_<split>.json; another JSON list (a
    captions file given by mistake) is named here, not met as a KeyError while scoring."""
    scenes = {}
    for index, record in enumerate(read_json(scenes_file, "scenes file", top=list)):
        objects = record.get("objects") if isinstance(record, dict) else None
        if "image_id" not in (record if isinstance(record, dict) else {}) or not isinstance(objects, list) \
                or not all(isinstance(o, dict) for o in objects):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise VLBridgeError(f"{scenes_file}, record [{index}]: not a scene (found {found}); expected a world's scenes file "
                                "(vlbridge world generate writes scenes_<split>.json): a list of {image_id, objects: [{...}, ...]}")
        scenes[record["image_id"]] = objects
    return scenes


def _described(obj: dict[str, Any]) -> str:
    """An object as captions can describe it (size, colour, shape, cell): its fields but the jitter."""
    return json.dumps({k: v for k, v in obj.items() if k not in JITTER_FIELDS}, sort_keys=True)
