"""Scenes of the world: a few coloured shapes on a coarse grid, as plain data (no pixels, no torch).

Every object sits in its own cell of a 3x3 grid, so "left of" (smaller column), "above" (smaller
row) and the cell names ("top left", "center", ...) are exact, and a caption or an answer can
always be recomputed from the scene alone. Pixels come later, from `render`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
    "purple": (150, 60, 205), "orange": (245, 140, 30), "white": (235, 235, 235),
}
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
# Relation words, and the test on (row, col) of the first object against the second.
RELATIONS: dict[str, Callable[["WorldObject", "WorldObject"], bool]] = {
    "to the left of": lambda a, b: a.col < b.col,
    "to the right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
}

Pair = tuple[str, str]  # (colour, shape)
Allowed = Callable[[str, str], bool]


def with_article(noun_phrase: str) -> str:
    """"a red circle", "an orange star": the indefinite article agrees with the next word's sound
    (every word of the world that starts with a vowel letter starts with a vowel sound)."""
    return f"{'an' if noun_phrase[:1] in 'aeiou' else 'a'} {noun_phrase}"


def cell_name(row: int, col: int) -> str:
    """A grid cell's name: "top left", "middle right", "center" (the middle of the middle row)."""
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"


CELLS: tuple[str, ...] = tuple(cell_name(r, c) for r in range(GRID) for c in range(GRID))


@dataclass(frozen=True)
class WorldObject:
    """One shape: what it is, which grid cell holds it, and its jitter inside the cell (-1..1)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    @property
    def cell(self) -> str:
        return cell_name(self.row, self.col)

    def phrase(self, size: bool = True) -> str:
        """"a large red circle", "an orange star" (or "a red circle" without the size)."""
        words = [self.size] if size else []
        return with_article(" ".join([*words, self.colour, self.shape]))


@dataclass(frozen=True)
class Scene:
    """An image's content: its objects in reading order (top to bottom, then left to right)."""

    image_id: int
    split: str
    objects: tuple[WorldObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "split": self.split, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        return cls(int(data["image_id"]), str(data["split"]), tuple(WorldObject(**o) for o in data["objects"]))

    def count(self, colour: str | None = None, shape: str | None = None, size: str | None = None) -> int:
        """How many objects match every attribute given."""
        return sum(1 for o in self.objects if _matches(o, colour, shape, size))

    def relations(self, a: WorldObject, b: WorldObject) -> list[str]:
        """Every relation word that holds for "a <relation> b"."""
        return [word for word, holds in RELATIONS.items() if holds(a, b)]


def _matches(obj: WorldObject, colour: str | None, shape: str | None, size: str | None) -> bool:
    return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape) and (size is None or obj.size == size)


def sample_scene(rng: random.Random, image_id: int, split: str, num_objects: int, allowed: Allowed,
                 required: Pair | None = None, duplicate_prob: float = 0.35) -> Scene:
    """Draw `num_objects` objects in distinct cells, every (colour, shape) pair `allowed`.

    `required` puts one object of that pair in the scene (the compositional split's held-out pair).
    With `duplicate_prob` an object repeats an earlier one's shape (half of those also its colour),
    so that counts above one are common enough to ask about.
    """
    cells = rng.sample(range(GRID * GRID), num_objects)
    objects: list[WorldObject] = []
    for k, cell in enumerate(cells):
        if k == 0 and required is not None:
            colour, shape = required
        else:
            colour, shape = _draw_pair(rng, objects, allowed, duplicate_prob)
        size = rng.choice(SIZES)
        dx, dy = rng.uniform(-1, 1), rng.uniform(-1, 1)
        objects.append(WorldObject(shape, colour, size, cell // GRID, cell % GRID, round(dx, 4), round(dy, 4)))
    return Scene(image_id, split, tuple(sorted(objects, key=lambda o: (o.row, o.col))))


def _draw_pair(rng: random.Random, earlier: list[WorldObject], allowed: Allowed, duplicate_prob: float) -> Pair:
    """A (colour, shape) pair: sometimes a repeat of an earlier object's shape or pair, else uniform."""
    if earlier and rng.random() < duplicate_prob:
        model = rng.choice(earlier)
        if rng.random() < 0.5:
            return model.pair
        options = [c for c in COLOURS if allowed(c, model.shape)]
        return rng.choice(options), model.shape
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if allowed(colour, shape):
            return colour, shape
