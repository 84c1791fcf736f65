"""What a frozen world encoder's tokens hold: fresh linear probes read each object's colour, shape
and size from the tokens of its grid cell, and which cells hold an object (the exact protocol is
`vlbridge.world.encoder_probe`'s docstring). Scores are on held-out test images.

    python bench/probe_world_encoder.py --encoder plugins/world/eva-vit-g   # images drawn from WorldConfig()
    python bench/probe_world_encoder.py --encoder DIR --world vlbridge-demo/world [--steps 3000]

`--encoder` is an encoder directory (config.json + model.safetensors, as `train_parts` writes it;
default the shipped `plugins/world/eva-vit-g`). `--world` is a folder `vlbridge world generate` (or
`vlbridge demo`) wrote; without it the train and test images are drawn from `WorldConfig()` (the
same scenes and pixels a default world has). Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlbridge.cli.argtypes import whole_number
from vlbridge.parts.images import load_image
from vlbridge.plugins.encoders.eva_vit_g import EvaVitGOptions
from vlbridge.plugins.encoders.eva_vit_g_model import build
from vlbridge.world import WorldConfig
from vlbridge.world.assets import part_dir
from vlbridge.world.encoder_probe import Tokens, encode, fit_probe, world_tokens
from vlbridge.world.scene import Scene


def folder_tokens(encoder: torch.nn.Module, world: Path, split: str, count: int) -> Tokens:
    """Tokens of a generated world folder's first `count` images of a split."""
    scenes = [Scene.from_dict(s) for s in json.loads((world / f"scenes_{split}.json").read_text(encoding="utf-8"))[:count]]
    images = [load_image(world / "images" / f"world_{split}_{s.image_id:07d}.png") for s in scenes]
    return encode(encoder, images, scenes)


POSITIVE = whole_number(1)  # 0 images or steps would fail deep in torch (no tokens to concatenate)


def _world_problem(world: Path) -> str | None:
    """Why a --world folder cannot be probed (no scenes file, or no images of a split), or None."""
    for split in ("train", "test"):
        scenes = world / f"scenes_{split}.json"
        if not scenes.is_file():
            return f"{scenes} not found: give a folder `vlbridge world generate` (or `vlbridge demo`) wrote"
        if not json.loads(scenes.read_text(encoding="utf-8")):
            return f"{scenes} holds no images: the probe trains on the train split and scores on the test split"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=Path, default=None, help="encoder directory (default: the shipped world encoder)")
    parser.add_argument("--world", type=Path, default=None, help="a generated world folder (scenes_*.json, images/); default: draw from WorldConfig() at the encoder's image size")
    parser.add_argument("--train", type=POSITIVE, default=3000, help="training images of the probe")
    parser.add_argument("--test", type=POSITIVE, default=300)
    parser.add_argument("--steps", type=POSITIVE, default=3000, help="full-batch steps of each linear probe (3000: converged; 300 reads shape 8 points low)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.world is not None and (problem := _world_problem(args.world)):
        parser.error(f"--world: {problem}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    folder = args.encoder or part_dir("eva-vit-g")
    encoder = build(EvaVitGOptions(pretrained=str(folder)))  # its config.json decides the architecture
    if args.world is None:
        world = WorldConfig(image_size=encoder.opts.resolved_image_size)  # drawn at the size the encoder reads
        train, test = (world_tokens(encoder, world, split, n) for split, n in (("train", args.train), ("test", args.test)))
    else:
        train, test = (folder_tokens(encoder, args.world, split, n) for split, n in (("train", args.train), ("test", args.test)))
    result = {"encoder": str(folder), "world": str(args.world or "WorldConfig()"), "tokens": [encoder.output_shape.num_tokens, encoder.output_shape.width],
              "train_images": len(train[0]), "test_images": len(test[0]), "steps": args.steps,
              **fit_probe(train, test, args.steps, args.seed), "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
