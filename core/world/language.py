"""Captions and questions of a scene, from a small grammar; every answer is computed from the scene.

Text is written already in the form BLIP's cleaning leaves it (lowercase; no punctuation but
commas and the question mark), so `clean_caption` / `clean_question` do not change it.
`allowed(colour, shape)` keeps held-out pairs out of every text of the splits that exclude them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from vlbridge.world.scene import CELLS, COLOURS, COLUMNS, PLURALS, RELATIONS, ROWS, SHAPES, SIZES, Allowed, Scene, WorldObject, with_article

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "scene" states every object with its size, colour, shape and cell: it is true of its scene alone
# (up to the jitter inside a cell), so retrieval can be scored exactly, and a reader given it can
# answer every question. The other kinds each say part of the scene, as real captions do.
BASE_CAPTION_KINDS = ("scene", "inventory", "counts", "relation", "location", "total")
# Kinds that state what the questions ask, so that a reader looks an answer up instead of inferring
# it: "above" and "left" write out which nameable object is above (left of) which, in the names the
# spatial questions use (a question about "below" or "right of" asks for the converse); "absent"
# names the shapes and colours the scene lacks. They draw no random numbers, so a world's questions
# are the same with them or without them, and they come after the describing kinds (a world of at
# most six captions per image is the world before they existed). Each stays within BLIP's 50 words.
STATING_CAPTION_KINDS = ("above", "left", "absent")
CAPTION_KINDS = BASE_CAPTION_KINDS + STATING_CAPTION_KINDS
QUESTION_KINDS = ("colour", "shape", "count", "spatial", "exist")
_REFERENCES = (("shape",), ("size", "shape"), ("colour", "shape"), ("size", "colour", "shape"), ("colour",), ("size", "colour"))


@dataclass(frozen=True)
class QA:
    """One question with its answer and VQAv2's two type fields (plus our own category)."""

    question: str
    answer: str
    category: str  # one of QUESTION_KINDS
    answer_type: str  # VQAv2's: "yes/no", "number" or "other"
    question_type: str  # VQAv2's: the question's opening words
    synonym: str | None = None  # an equally right answer some annotators give ("two" for "2")


# -- captions ---------------------------------------------------------------------------------


def join(phrases: list[str]) -> str:
    """"x", "x and y", "x, y and z"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def join_or(words: list[str]) -> str:
    """"x", "x or y", "x, y or z"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def counted(count: int, colour: str, shape: str) -> str:
    """"a red circle" or "two red circles"."""
    return with_article(f"{colour} {shape}") if count == 1 else f"{NUMBER_WORDS[count]} {colour} {PLURALS[shape]}"


def caption(scene: Scene, kind: str, rng: random.Random) -> str:
    """One caption of the given kind (see CAPTION_KINDS)."""
    objects = scene.objects
    if kind == "scene":
        return join([f"{o.phrase()} at the {o.cell}" for o in objects])
    if kind == "inventory":
        return join([o.phrase() for o in objects])
    if kind == "counts":
        groups = list(dict.fromkeys(o.pair for o in objects))
        return join([counted(scene.count(c, s), c, s) for c, s in groups])
    if kind == "relation":
        if len(objects) == 1:
            return f"{objects[0].phrase()} at the {objects[0].cell}"
        a, b = rng.sample(objects, 2)
        return f"{a.phrase()} {rng.choice(scene.relations(a, b))} {b.phrase()}"
    if kind == "location":
        chosen = objects if len(objects) <= 2 else sorted(rng.sample(objects, 2), key=objects.index)
        return join([f"{o.phrase(size=False)} at the {o.cell}" for o in chosen])
    if kind == "total":
        if len(objects) == 1:
            return f"a picture of a single {objects[0].colour} {objects[0].shape}"
        return f"a picture of {NUMBER_WORDS[len(objects)]} shapes"
    if kind == "above":
        return ordering(scene, "row")
    if kind == "left":
        return ordering(scene, "col")
    if kind == "absent":
        return absent(scene)
    raise ValueError(f"unknown caption kind {kind!r}; choose from {CAPTION_KINDS}")


def ordering(scene: Scene, axis: str) -> str:
    """Which nameable object is "above" (axis "row") or "to the left of" (axis "col") which, one
    statement per object that has any: "the red circle is above the star and the large square".
    Objects are named as the spatial questions name them; pairs on one row (column) are left out,
    and where every pair is, that is said. With one nameable object, its row (column), since the
    questions then ask for its cell; with none (identical twins only), that."""
    named = [(o, refer(scene, o, allow_cell=False)) for o in scene.objects]
    named = [(o, ref) for o, ref in named if ref is not None]
    if not named:
        return "the shapes all look the same"
    if len(named) == 1:
        obj, ref = named[0]
        return f"{ref} is in the {ROWS[obj.row]} row" if axis == "row" else f"{ref} is in the {COLUMNS[obj.col]} column"
    word = "above" if axis == "row" else "to the left of"
    order = sorted(named, key=lambda item: (getattr(item[0], axis), item[0].row, item[0].col))
    statements = [f"{ref} is {word} {' and '.join(r for o, r in order if getattr(o, axis) > getattr(obj, axis))}"
                  for obj, ref in order if any(getattr(o, axis) > getattr(obj, axis) for o, _ in order)]
    return ", ".join(statements) or f"{join([ref for _, ref in named])} are in the same {'row' if axis == 'row' else 'column'}"


def absent(scene: Scene) -> str:
    """The shapes and colours the scene lacks: "there are no stars or crosses and nothing blue or white"
    (with at most four objects some of each are always missing)."""
    shapes = [PLURALS[s] for s in SHAPES if not scene.count(shape=s)]
    colours = [c for c in COLOURS if not scene.count(colour=c)]
    parts = ([f"no {join_or(shapes)}"] if shapes else []) + ([f"nothing {join_or(colours)}"] if colours else [])
    return "there are " + " and ".join(parts) if parts else "every shape and every color is there"


def caption_kinds(count: int, rng: random.Random) -> tuple[str, ...]:
    """The kinds of an image's `count` captions: the base kinds (a random few, in order, below six),
    then the stating kinds; a world of at most six captions is the world before they existed."""
    base = len(BASE_CAPTION_KINDS)
    if count >= base:
        return BASE_CAPTION_KINDS + STATING_CAPTION_KINDS[: count - base]
    return tuple(sorted(rng.sample(BASE_CAPTION_KINDS, count), key=BASE_CAPTION_KINDS.index))


def captions(scene: Scene, count: int, rng: random.Random) -> list[str]:
    """`count` captions of distinct kinds (`caption_kinds`), in CAPTION_KINDS order."""
    return [caption(scene, kind, rng) for kind in caption_kinds(count, rng)]


# -- referring to one object ------------------------------------------------------------------


def refer(scene: Scene, obj: WorldObject, without: str | None = None, allow_cell: bool = True) -> str | None:
    """The shortest unique description of `obj` ("the red circle", "the large object" is not one:
    nouns are the shape or "object"), never naming the attribute `without`; the cell as last resort."""
    for attrs in _REFERENCES:
        if without in attrs:
            continue
        values = {a: getattr(obj, a) for a in attrs}
        if scene.count(values.get("colour"), values.get("shape"), values.get("size")) == 1:
            noun = obj.shape if "shape" in attrs else "object"
            return " ".join(["the", *(values[a] for a in attrs if a != "shape"), noun])
    return f"the object at the {obj.cell}" if allow_cell else None


# -- questions --------------------------------------------------------------------------------


def _colour_question(scene: Scene, rng: random.Random, allowed: Allowed) -> QA:
    obj = rng.choice(scene.objects)
    return QA(f"what color is {refer(scene, obj, without='colour')}?", obj.colour, "colour", "other", "what color is the")


def _shape_question(scene: Scene, rng: random.Random, allowed: Allowed) -> QA:
    obj = rng.choice(scene.objects)
    return QA(f"what shape is {refer(scene, obj, without='shape')}?", obj.shape, "shape", "other", "what shape is the")


def _count_question(scene: Scene, rng: random.Random, allowed: Allowed) -> QA:
    """Count by shape, colour, both, or everything; the target is usually present (70%)."""
    model = rng.choice(scene.objects)
    colour, shape = model.pair
    if rng.random() >= 0.7:
        colour, shape = _allowed_pair(rng, allowed)
    kind = rng.choice(("shape", "colour", "both", "all"))
    colour = colour if kind in ("colour", "both") else None
    shape = shape if kind in ("shape", "both") else None
    noun = PLURALS[shape] if shape else "shapes"
    things = f"{colour} {noun}" if colour else noun
    number = scene.count(colour, shape)
    return QA(f"how many {things} are there?", str(number), "count", "number", "how many", NUMBER_WORDS[number])


def _spatial_question(scene: Scene, rng: random.Random, allowed: Allowed) -> QA:
    """"is the A <relation> the B?" (yes or no, even odds); with one nameable object "is the A at
    the <cell>?"; with none (identical twins only), an existence question instead."""
    yes = rng.random() < 0.5
    named = [(o, refer(scene, o, allow_cell=False)) for o in scene.objects]
    named = [(o, ref) for o, ref in named if ref is not None]
    if not named:
        return _exist_question(scene, rng, allowed)
    if len(named) == 1:
        obj, ref = named[0]
        cell = obj.cell if yes else rng.choice([c for c in CELLS if c != obj.cell])
        return QA(f"is {ref} at the {cell}?", _yes_no(yes), "spatial", "yes/no", "is the")
    (a, ref_a), (b, ref_b) = rng.sample(named, 2)
    holding = scene.relations(a, b)
    relation = rng.choice(holding if yes else [r for r in RELATIONS if r not in holding])
    return QA(f"is {ref_a} {relation} {ref_b}?", _yes_no(yes), "spatial", "yes/no", "is the")


def _exist_question(scene: Scene, rng: random.Random, allowed: Allowed) -> QA:
    """"is there a <colour> <shape>?" or "is there a <size> <shape>?", yes or no at even odds."""
    yes = rng.random() < 0.5
    by_size = rng.random() < 0.3
    present = {(o.size, o.shape) if by_size else o.pair for o in scene.objects}
    if yes:
        first, shape = rng.choice(sorted(present))
    else:
        absent = [(a, s) for a in (SIZES if by_size else COLOURS) for s in SHAPES
                  if (a, s) not in present and (by_size or allowed(a, s))]
        first, shape = rng.choice(absent)
    return QA(f"is there {with_article(f'{first} {shape}')}?", _yes_no(yes), "exist", "yes/no", "is there a")


QUESTION_MAKERS: dict[str, Callable[[Scene, random.Random, Allowed], QA]] = {
    "colour": _colour_question, "shape": _shape_question, "count": _count_question,
    "spatial": _spatial_question, "exist": _exist_question,
}


def questions(scene: Scene, count: int, rng: random.Random, allowed: Allowed) -> list[QA]:
    """`count` distinct questions, cycling through QUESTION_KINDS (one of each for 5)."""
    out: list[QA] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < count and tries < 10 * count:
        kind = QUESTION_KINDS[tries % len(QUESTION_KINDS)] if count >= len(QUESTION_KINDS) else rng.choice(QUESTION_KINDS)
        tries += 1
        qa = QUESTION_MAKERS[kind](scene, rng, allowed)
        if qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
    return out


def _allowed_pair(rng: random.Random, allowed: Allowed) -> tuple[str, str]:
    return rng.choice([(c, s) for c in COLOURS for s in SHAPES if allowed(c, s)])


def _yes_no(yes: bool) -> str:
    return "yes" if yes else "no"
