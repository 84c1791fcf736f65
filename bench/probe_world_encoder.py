"""What the world's frozen encoder tokens hold: a probe reads each grid cell's colour, shape and size.

Why: a bridge can only pass on what the frozen encoder's tokens contain. Nine learned cell queries
attend to the encoder's tokens (one attention layer, as a tiny Q-Former) and classify each cell's
colour, shape and size ("empty" is a class). Accuracy on the occupied cells of the test split says
which attributes are there to be bridged; occupancy accuracy says whether positions are.

    python bench/probe_world_encoder.py --world vlbridge-demo/world [--steps 1500]

The world folder is one `vlbridge world generate` (or `vlbridge demo`) wrote. Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import vlbridge
from vlbridge.images import load_image
from vlbridge.world.scene import COLOURS, GRID, SHAPES, SIZES

ATTRIBUTES = ("colour", "shape", "size")
CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)  # + "empty"


def cell_labels(scenes: list[dict]) -> torch.Tensor:
    """(N, 9, 3) class ids per cell: colour, shape, size (0 = empty cell)."""
    labels = torch.zeros(len(scenes), GRID * GRID, 3, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene["objects"]:
            values = (list(COLOURS).index(obj["colour"]) + 1, SHAPES.index(obj["shape"]) + 1, SIZES.index(obj["size"]) + 1)
            labels[row, obj["row"] * GRID + obj["col"]] = torch.tensor(values)
    return labels


def encoder_tokens(model, world: Path, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = json.loads((world / f"scenes_{split}.json").read_text(encoding="utf-8"))[:count]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(scenes), 100):
            images = [load_image(world / "images" / f"world_{split}_{s['image_id']:07d}.png") for s in scenes[start:start + 100]]
            chunks.append(model.encode_images(model.pixel_values(images)))
    return torch.cat(chunks), cell_labels(scenes)


class CellProbe(nn.Module):
    """Nine cell queries, one cross-attention, an MLP and one head per attribute."""

    def __init__(self, width: int, hidden: int = 256) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(GRID * GRID, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in CLASSES)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.norm(tokens)
        cells, _ = self.attention(self.queries.expand(len(tokens), -1, -1), tokens, tokens)
        hidden = self.mlp(cells)
        return [head(hidden) for head in self.heads]


def probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = CellProbe(train[0].shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        rows = torch.randint(0, len(train[0]), (64,))
        logits = model(train[0][rows])
        loss = sum(nn.functional.cross_entropy(out.flatten(0, 1), train[1][rows][..., i].flatten()) for i, out in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(test[0])
    occupied = test[1][..., 0] > 0
    result = {f"{name}_on_occupied_cells": round((out.argmax(-1)[occupied] == test[1][..., i][occupied]).float().mean().item(), 3)
              for i, (name, out) in enumerate(zip(ATTRIBUTES, logits))}
    result["occupancy"] = round(((logits[0].argmax(-1) > 0) == occupied).float().mean().item(), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, type=Path, help="a generated world folder (scenes_*.json, images/)")
    parser.add_argument("--assembly", default="world-linear-opt", help="preset whose encoder is probed")
    parser.add_argument("--train", type=int, default=3000, help="training images of the probe")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = vlbridge.build(args.assembly)
    train, test = encoder_tokens(model, args.world, "train", args.train), encoder_tokens(model, args.world, "test", args.test)
    result = {"assembly": args.assembly, "train_images": len(train[0]), "test_images": len(test[0]), "steps": args.steps,
              **probe(train, test, args.steps, args.seed), "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
