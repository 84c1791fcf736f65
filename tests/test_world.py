"""The synthetic world: deterministic files, held-out pairs kept out, formats the readers take,
answers that follow from the scene (recomputed here by an independent parser) and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlbridge.cli.main import main
from vlbridge.data import clean_caption, clean_question, group_captions, read_coco_captions, read_vqa
from vlbridge.world import SPLITS, WorldConfig, generate_world
from vlbridge.world.generate import IMAGE_PATTERN
from vlbridge.world.render import centre_and_radius
from vlbridge.world.scene import CELLS, COLOURS, GRID, PLURALS, RELATIONS, Scene

SMALL = WorldConfig(train=40, val=12, test=8, comp=12, seed=7)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(world: Path, split: str) -> list[Scene]:
    return [Scene.from_dict(s) for s in json.loads((world / f"scenes_{split}.json").read_text())]


def test_same_seed_same_files_other_seed_other_files(world, tmp_path):
    generate_world(tmp_path / "again", SMALL)
    assert _files(tmp_path / "again") == _files(world)
    generate_world(tmp_path / "other", SMALL.model_copy(update={"seed": 8}))
    other = _files(tmp_path / "other")
    assert other.keys() == _files(world).keys() and other["captions_train.json"] != _files(world)["captions_train.json"]


def test_a_split_does_not_depend_on_the_size_of_the_others(world, tmp_path):
    generate_world(tmp_path / "w", SMALL.model_copy(update={"train": 5, "comp": 0}))
    assert (tmp_path / "w" / "captions_val.json").read_bytes() == (world / "captions_val.json").read_bytes()


def test_held_out_pairs_only_in_comp_and_never_named_elsewhere(world):
    held = set(SMALL.held_out)
    for split in SPLITS:
        scenes = _scenes(world, split)
        assert len(scenes) == SMALL.size(split)
        has_held = [any(o.pair in held for o in s.objects) for s in scenes]
        assert all(has_held) if split == "comp" else not any(has_held)
    names = [f"{c} {s}" for c, s in held] + [f"{c} {PLURALS[s]}" for c, s in held]
    for split in ("train", "val", "test"):
        text = (world / f"captions_{split}.json").read_text() + (world / f"questions_{split}.json").read_text()
        assert not [n for n in names if n in text]
    ids = [s.image_id for split in SPLITS for s in _scenes(world, split)]
    assert len(ids) == len(set(ids))


def test_the_readers_take_the_files(world):
    captions = read_coco_captions(world / "captions_val.json")
    groups = group_captions(captions)
    assert len(groups) == SMALL.val and all(len(g.captions) == SMALL.captions_per_image for g in groups)
    assert all(Path(g.image.path).is_file() for g in groups)
    assert all(clean_caption(c.text) == c.text for c in captions)
    questions = read_vqa(world / "questions_comp.json", world / "annotations_comp.json", image_pattern=IMAGE_PATTERN)
    assert len(questions) == SMALL.comp * SMALL.questions_per_image
    assert all(len(q.answers) == 10 and q.answer_type in ("yes/no", "number", "other") and q.question_type for q in questions)
    assert all(Path(q.image.path).is_file() and clean_question(q.question) == q.question for q in questions)
    numbers = [q for q in questions if q.answer_type == "number"]
    assert numbers and all(q.answers[:8] == [q.extra["multiple_choice_answer"]] * 8 and q.answers[9] != q.answers[0] for q in numbers)


def _resolve(scene: Scene, ref: str):
    """The one object a reference ("the large red object", "the object at the top left") names."""
    cell = re.fullmatch(r"the object at the (.+)", ref)
    if cell:
        return next(o for o in scene.objects if o.cell == cell[1])
    words = ref.split()[1:]
    found = [o for o in scene.objects if all(w in (o.size, o.colour, o.shape, "object") for w in words) and words[-1] in (o.shape, "object")]
    assert len(found) == 1, (ref, scene)
    return found[0]


def _answer(scene: Scene, question: str) -> str:
    """An answer computed from the scene alone, without the generator's code."""
    yes_no = {True: "yes", False: "no"}
    if m := re.fullmatch(r"what color is (.+)\?", question):
        return _resolve(scene, m[1]).colour
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        return _resolve(scene, m[1]).shape
    if m := re.fullmatch(r"how many (?:(\w+) )?(\w+) are there\?", question):
        colour, noun = m[1], m[2]
        shape = {v: k for k, v in PLURALS.items()}.get(noun)
        return str(sum((colour in (None, o.colour)) and (shape in (None, o.shape)) for o in scene.objects))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return yes_no[any(m[1] in (o.colour, o.size) and o.shape == m[2] for o in scene.objects)]
    if m := re.fullmatch(r"is (the .+?) at the (.+)\?", question):
        return yes_no[_resolve(scene, m[1]).cell == m[2]]
    relation = "|".join(RELATIONS)
    m = re.fullmatch(rf"is (the .+?) ({relation}) (the .+)\?", question)
    assert m, question
    a, b = _resolve(scene, m[1]), _resolve(scene, m[3])
    delta = {"to the left of": b.col - a.col, "to the right of": a.col - b.col, "above": b.row - a.row, "below": a.row - b.row}
    return yes_no[delta[m[2]] > 0]


@pytest.mark.parametrize("split", ["train", "comp"])
def test_every_answer_follows_from_the_scene(world, split):
    scenes = {s.image_id: s for s in _scenes(world, split)}
    questions = read_vqa(world / f"questions_{split}.json", world / f"annotations_{split}.json", image_pattern=IMAGE_PATTERN)
    kinds = set()
    for q in questions:
        assert _answer(scenes[q.image_id], q.question) == q.extra["multiple_choice_answer"], q.question
        kinds.add(json.dumps(q.question_type))
    assert len(kinds) == 5


def _all_text(world: Path) -> list[str]:
    texts = []
    for split in SPLITS:
        texts += [c for record in json.loads((world / f"captions_{split}.json").read_text()) for c in record["caption"]]
        texts += [q["question"] for q in json.loads((world / f"questions_{split}.json").read_text())["questions"]]
    return texts


def test_the_indefinite_article_agrees(world):
    texts = _all_text(world)
    assert any(" an orange " in f" {t} " for t in texts)  # the one colour with a vowel sound
    wrong = [t for t in texts if re.search(r"\ba [aeiou]", t) or re.search(r"\ban [^aeiou\s]", t)]
    assert not wrong, wrong[:5]


SCENE_OBJECT = re.compile(r"an? (small|large) (\w+) (\w+) at the ((?:top|middle|bottom) (?:left|center|right)|center)")


@pytest.mark.parametrize("split", SPLITS)
def test_the_scene_caption_states_every_object_and_nothing_else(world, split):
    """Parsed back, the first caption of each image is its scene: every object with its size,
    colour, shape and cell, in reading order, so it is true of that scene alone (up to jitter)."""
    records = {r["image_id"]: r for r in json.loads((world / f"captions_{split}.json").read_text())}
    for scene in _scenes(world, split):
        text = records[scene.image_id]["caption"][0]
        parsed = [m.groups() for m in SCENE_OBJECT.finditer(text)]
        assert parsed == [(o.size, o.colour, o.shape, o.cell) for o in scene.objects], text
        assert SCENE_OBJECT.sub("X", text).replace(", ", " ").replace(" and ", " ").split() == ["X"] * len(scene.objects)


def test_pixels_show_the_scene(world):
    from PIL import Image

    for scene in _scenes(world, "val")[:6]:
        pixels = Image.open(world / IMAGE_PATTERN.format(split="val", image_id=scene.image_id)).convert("RGB")
        for obj in scene.objects:
            x, y, _ = centre_and_radius(obj, SMALL.image_size / GRID)
            got = pixels.getpixel((int(x), int(y)))
            assert max(abs(a - b) for a, b in zip(got, COLOURS[obj.colour])) < 40, (obj, got)
    assert len(CELLS) == GRID * GRID


def test_cli_generate_and_its_errors(tmp_path, capsys):
    assert main(["world", "generate", "--out", str(tmp_path / "w"), "--train", "3", "--val", "1", "--test", "1", "--comp", "1", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["stats"]["train"]["images"] == 3 and (tmp_path / "w" / "manifest.json").is_file()
    assert main(["world", "generate", "--out", str(tmp_path / "w"), "--train", "2", "--val", "2", "--test", "1", "--comp", "1"]) == 0
    assert len(list((tmp_path / "w" / "images").iterdir())) == 6  # a world written before is replaced
    assert main(["world", "generate", "--out", str(tmp_path / "w"), "--image-size", "8"]) == 2
    assert "--image-size" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["world", "generate", "--out", str(tmp_path / "other")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "other" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("bad, message", [
    ({"held_out": [("pink", "circle")]}, "not a colour"),
    ({"held_out": [(c, "star") for c in COLOURS]}, "never appear in training"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects 3 > max_objects 2"),
    ({"colour": "red"}, "Extra inputs"),
])
def test_bad_world_configs_say_why(bad, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        WorldConfig(**bad)
