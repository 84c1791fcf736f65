"""What a frozen world encoder's tokens hold about each object: a linear probe per attribute.

Why: a bridge can only pass on what the frozen encoder's tokens contain, and a linear read-out of
the tokens where an object sits is the least a bridge has to learn to get at it.

The protocol, exactly:

1. Tokens: each image of a split is rendered at the world's image size and fed through the
   encoder's own preprocess; the encoder returns `(T, W)` tokens, [CLS] first, then a `g x g`
   patch grid.
2. Cell features: for each of the 3x3 grid cells, the mean of the patch tokens whose patch centre
   falls inside that cell (`cell_pool`; [CLS] is not used), so `(9, W)` per image. Each dimension is
   standardised with the train split's mean and std (an affine map: the probe stays linear).
3. Colour, shape, size: one linear classifier (softmax regression) per attribute, shared by all
   nine cells, trained on the cell features of every object of the train split's images (the cell
   that holds the object) and scored on every object of the test split's images: accuracy over
   test objects.
4. Position: one linear classifier, shared by the cells, reads each cell as holding an object or
   empty; trained on every cell of the train images and scored on every cell of the test images
   (nine per image): accuracy over test cells. Calling every cell empty scores about 0.72.
5. Training: full-batch AdamW (lr 0.01, weight decay 1e-4) for `steps` steps from a fixed seed.

`bench/probe_world_encoder.py` is its command line; `train_parts` records it in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlbridge.parts.images import to_pixel_batch
from vlbridge.world.config import WorldConfig
from vlbridge.world.generate import make_image
from vlbridge.world.render import render_scene
from vlbridge.world.scene import COLOURS, GRID, SHAPES, SIZES, Scene

ATTRIBUTES = ("colour", "shape", "size")
CLASSES = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES)}
Tokens = tuple[torch.Tensor, torch.Tensor]  # (N, 9, W) cell features and their (N, 9, 3) labels (-1 = empty cell)


def cell_weights(grid: int) -> torch.Tensor:
    """(9, g*g) averaging weights: cell c averages the patches whose centre lies inside it."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid  # patch centres, 0..1 of the side
    band = (centres * GRID).floor().long()  # which row (or column) of cells each patch row falls in
    member = (band[:, None, None, None] == torch.arange(GRID)[None, None, :, None]) & \
             (band[None, :, None, None] == torch.arange(GRID)[None, None, None, :])  # (g, g, 3, 3)
    weights = member.reshape(grid * grid, GRID * GRID).T.float()  # (9, g*g)
    return weights / weights.sum(1, keepdim=True)


def cell_pool(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + g*g, W) encoder tokens -> (B, 9, W) per-cell means of the patch tokens."""
    grid = round((tokens.shape[1] - 1) ** 0.5)
    if grid * grid + 1 != tokens.shape[1]:
        raise ValueError(f"expected [CLS] + a square patch grid, got {tokens.shape[1]} tokens")
    return torch.einsum("cp,bpw->bcw", cell_weights(grid).to(tokens.dtype), tokens[:, 1:])


def cell_labels(scenes: Sequence[Scene]) -> torch.Tensor:
    """(N, 9, 3) class ids per cell in reading order: colour, shape, size; -1 for an empty cell."""
    labels = torch.full((len(scenes), GRID * GRID, len(ATTRIBUTES)), -1, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            values = (list(COLOURS).index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size))
            labels[row, obj.row * GRID + obj.col] = torch.tensor(values)
    return labels


@torch.no_grad()
def encode(encoder: nn.Module, images: Sequence, scenes: Sequence[Scene], chunk: int = 100) -> Tokens:
    """Cell features of PIL `images` (through the encoder's own preprocess, as a model feeds it)."""
    parts = [cell_pool(encoder(to_pixel_batch(list(images[at: at + chunk]), encoder.preprocess)).float())
             for at in range(0, len(images), chunk)]
    return torch.cat(parts), cell_labels(scenes)


def world_tokens(encoder: nn.Module, world: WorldConfig, split: str, count: int) -> Tokens:
    """Cell features of a split's first `count` images, drawn from the world and rendered at its
    image size (the same pixels `generate_world` writes)."""
    scenes = [make_image(world, split, i).scene for i in range(count)]
    return encode(encoder, [render_scene(s, world.image_size) for s in scenes], scenes)


def probe_encoder(encoder: nn.Module, world: WorldConfig, train: int = 3000, test: int = 300, steps: int = 3000,
                  seed: int = 0) -> dict[str, float]:
    """Fit the linear probes on the train split's tokens and score them on the test split's."""
    return fit_probe(world_tokens(encoder, world, "train", train), world_tokens(encoder, world, "test", test), steps, seed)


def _fit_linear(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int) -> nn.Linear:
    """Softmax regression, full batch."""
    head = nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def fit_probe(train: Tokens, test: Tokens, steps: int, seed: int) -> dict[str, float]:
    """Train fresh linear probes on `train` and score them on `test` (see the module docstring)."""
    torch.manual_seed(seed)
    mean, std = train[0].mean((0, 1)), train[0].std((0, 1)) + 1e-6
    (x_train, y_train), (x_test, y_test) = ((((x - mean) / std).flatten(0, 1), y.flatten(0, 1)) for x, y in (train, test))
    on_train, on_test = y_train[:, 0] >= 0, y_test[:, 0] >= 0  # occupied cells
    result: dict[str, float] = {}
    with torch.enable_grad():
        for i, name in enumerate(ATTRIBUTES):
            head = _fit_linear(x_train[on_train], y_train[on_train, i], CLASSES[name], steps)
            with torch.no_grad():
                right = head(x_test[on_test]).argmax(-1) == y_test[on_test, i]
            result[name] = round(right.float().mean().item(), 4)
        head = _fit_linear(x_train, on_train.long(), 2, steps)
    with torch.no_grad():
        result["position"] = round((head(x_test).argmax(-1) == on_test.long()).float().mean().item(), 4)
    result["test_objects"] = int(on_test.sum())
    return result
