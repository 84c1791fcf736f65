"""The world language's stating captions ("above", "left", "absent"): parsed back independently,
each says exactly what the scene holds, names objects as the questions do, fits BLIP's 50 words,
and adding them changes no question of any world."""

from __future__ import annotations

import re

import pytest

from vlbridge.data import clean_caption
from vlbridge.world import WorldConfig
from vlbridge.world.generate import make_image
from vlbridge.world.language import BASE_CAPTION_KINDS, CAPTION_KINDS, STATING_CAPTION_KINDS
from vlbridge.world.scene import COLOURS, PLURALS, SHAPES, Scene, WorldObject

WORLD = WorldConfig(seed=3)
IMAGES = [make_image(WORLD, split, i) for split in ("train", "comp") for i in range(150)]
STATED = {kind: CAPTION_KINDS.index(kind) for kind in STATING_CAPTION_KINDS}


def _named(scene: Scene) -> list[WorldObject]:
    """Objects a question can name: the only one of their size, colour and shape."""
    return [o for o in scene.objects if scene.count(o.colour, o.shape, o.size) == 1]


def _resolve(scene: Scene, ref: str) -> WorldObject:
    words = ref.split()
    assert words[0] == "the", ref
    found = [o for o in scene.objects if all(w in (o.size, o.colour, o.shape, "object") for w in words[1:])
             and words[-1] in (o.shape, "object")]
    assert len(found) == 1, (ref, scene)
    return found[0]


def _stated_pairs(scene: Scene, text: str, word: str, axis: str) -> set[tuple[int, int]]:
    """(first, second) object indices of every "A is <word> B and C" statement, each checked true."""
    pairs = set()
    for statement in text.split(", "):
        subject, _, rest = statement.partition(f" is {word} ")
        assert rest, statement
        a = _resolve(scene, subject)
        for ref in rest.split(" and "):
            b = _resolve(scene, ref)
            assert getattr(a, axis) < getattr(b, axis), statement
            pairs.add((scene.objects.index(a), scene.objects.index(b)))
    return pairs


@pytest.mark.parametrize("kind,word,axis,line", [("above", "above", "row", "row"), ("left", "to the left of", "col", "column")])
def test_above_and_left_state_every_pair_of_named_objects_and_only_true_ones(kind, word, axis, line):
    seen = set()
    for image in IMAGES:
        scene, text = image.scene, image.captions[STATED[kind]]
        named = _named(scene)
        if not named:
            assert text == "the shapes all look the same"
            seen.add("none")
        elif len(named) == 1:
            values = ("top", "middle", "bottom") if axis == "row" else ("left", "center", "right")
            assert re.fullmatch(rf"(the .+) is in the (\w+) {line}", text), text
            obj = _resolve(scene, text.split(" is in the ")[0])
            assert obj is named[0] and text.endswith(f"the {values[getattr(obj, axis)]} {line}")
            seen.add("one")
        elif text.endswith(f"are in the same {line}"):
            assert len({getattr(o, axis) for o in named}) == 1, text
            seen.add("same")
        else:
            expected = {(scene.objects.index(a), scene.objects.index(b)) for a in named for b in named
                        if getattr(a, axis) < getattr(b, axis)}
            assert _stated_pairs(scene, text, word, axis) == expected, (text, scene)
            seen.add("pairs")
    assert seen == {"one", "same", "pairs"} or seen == {"none", "one", "same", "pairs"}


def test_absent_names_exactly_the_missing_shapes_and_colours():
    pattern = re.compile(r"there are no (.+) and nothing (.+)")
    for image in IMAGES:
        scene, text = image.scene, image.captions[STATED["absent"]]
        m = pattern.fullmatch(text)
        assert m, text
        shapes = {s for s in SHAPES if PLURALS[s] in re.split(r", | or ", m[1])}
        colours = set(re.split(r", | or ", m[2]))
        assert shapes == {s for s in SHAPES if not scene.count(shape=s)}, text
        assert colours == {c for c in COLOURS if not scene.count(colour=c)}, text


def test_stating_captions_are_clean_and_within_blips_fifty_words():
    for image in IMAGES:
        for text in image.captions[len(BASE_CAPTION_KINDS):]:
            assert clean_caption(text) == text, text
            assert len(text.split()) <= 50


def test_the_spatial_questions_are_answered_by_the_stating_captions():
    """A two-object spatial question is a look-up in "above"/"left" (or its converse)."""
    relation = re.compile(r"is (the .+?) (to the left of|to the right of|above|below) (the .+)\?")
    asked = 0
    for image in IMAGES:
        scene = image.scene
        rows = _stated_pairs(scene, image.captions[STATED["above"]], "above", "row") if " is above " in image.captions[STATED["above"]] else set()
        cols = _stated_pairs(scene, image.captions[STATED["left"]], "to the left of", "col") if " is to the left of " in image.captions[STATED["left"]] else set()
        for qa in image.qas:
            m = relation.fullmatch(qa.question)
            if not m:
                continue
            a, b = (scene.objects.index(_resolve(scene, m[k])) for k in (1, 3))
            looked_up = {"above": (a, b) in rows, "below": (b, a) in rows,
                         "to the left of": (a, b) in cols, "to the right of": (b, a) in cols}[m[2]]
            assert ("yes" if looked_up else "no") == qa.answer, (qa.question, image.captions)
            asked += 1
    assert asked > 50


@pytest.mark.parametrize("count", [6, 7, 8])
def test_the_stating_kinds_change_no_question_and_no_earlier_caption(count):
    """Stating kinds draw no random numbers: a world of six captions per image (the world before
    they existed) or of some of them has the same questions and first six captions as the full one."""
    fewer = WORLD.model_copy(update={"captions_per_image": count})
    for i in range(60):
        full, small = make_image(WORLD, "train", i), make_image(fewer, "train", i)
        assert small.qas == full.qas
        assert small.captions == full.captions[:count]
