"""`WorldConfig`: how big the world is and what it holds out; the seed makes it reproducible."""

from __future__ import annotations

import random

from pydantic import ConfigDict, Field, model_validator

from vlbridge.world.scene import COLOURS, GRID, SHAPES, Allowed, Pair
from vlbridge.files.config_fields import StrictNumbers

SPLITS: tuple[str, ...] = ("train", "val", "test", "comp")
# The held-out split and the frozen parts' own stream: their images never share an id with the splits'.
ID_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000, "comp": 3_000_000, "pretrain": 5_000_000}
# One pair per shape, each of another colour: every colour and every shape still appears in training.
DEFAULT_HELD_OUT: tuple[Pair, ...] = (("red", "triangle"), ("blue", "star"), ("green", "cross"), ("yellow", "circle"), ("purple", "square"))


MAX_IMAGES = 1_000_000  # per split: a few GB of PNGs; a typo of more zeros would fill the disk without a word


class WorldConfig(StrictNumbers):
    """The world's size and content. `comp` is the compositional test split: each of its images
    holds a (colour, shape) pair of `held_out`, which no other split (and no text there) contains."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(0, description="one seed for every split: scene i of a split depends only on (seed, split, i)")
    train: int = Field(3000, ge=0, le=MAX_IMAGES, description="training images")
    val: int = Field(300, ge=0, le=MAX_IMAGES, description="validation images")
    test: int = Field(300, ge=0, le=MAX_IMAGES, description="test images (same distribution as train)")
    comp: int = Field(300, ge=0, le=MAX_IMAGES, description="compositional test images (each with a held-out colour+shape pair)")
    image_size: int = Field(64, ge=16, le=1024, description="image side in pixels (the shipped world encoder reads 64 px)")
    min_objects: int = Field(1, ge=1, le=GRID * GRID)
    max_objects: int = Field(4, ge=1, le=GRID * GRID)
    captions_per_image: int = Field(9, ge=1, le=9, description="captions per image, each of another kind (9: every kind; 6: the six "
                                    "describing kinds, the world before 'above', 'left' and 'absent'; below 6: a random few of those)")
    questions_per_image: int = Field(5, ge=1, le=10, description="questions per image (5: one of each kind)")
    duplicate_prob: float = Field(0.35, ge=0, le=1, description="chance an object repeats an earlier one's shape (for counting)")
    synonym_answers: int = Field(2, ge=0, le=9, description="of the 10 answers, how many give the synonym where one exists ('two' for '2')")
    held_out: tuple[Pair, ...] = Field(DEFAULT_HELD_OUT, description="(colour, shape) pairs only the comp split shows")

    @model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects {self.min_objects} > max_objects {self.max_objects}")
        for colour, shape in self.held_out:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"held-out pair ({colour!r}, {shape!r}) is not a colour of {list(COLOURS)} with a shape of {list(SHAPES)}")
        for shape in SHAPES:
            if all((c, shape) in self.held_out for c in COLOURS):
                raise ValueError(f"every colour of {shape!r} is held out: the shape would never appear in training")
        if self.comp and not self.held_out:
            raise ValueError("the comp split needs held-out pairs; give held_out or set comp to 0")
        return self

    def size(self, split: str) -> int:
        return getattr(self, split)

    def allowed(self, split: str) -> Allowed:
        """Which (colour, shape) pairs may appear in a split: all in comp, the others none held out."""
        if split == "comp":
            return lambda colour, shape: True
        held = frozenset(self.held_out)
        return lambda colour, shape: (colour, shape) not in held

    def image_rng(self, split: str, index: int) -> random.Random:
        """The one random stream of an image (its scene, captions and questions); str seeds hash
        with SHA-512, so it is the same in every process and Python version."""
        return random.Random(f"vlbridge-world:{self.seed}:{split}:{index}")
