"""`vlbridge world generate --out DIR`: write the small synthetic world (images, captions, VQA)."""

from __future__ import annotations

import argparse
import time

from vlbridge.cli.output import print_json, print_table
from vlbridge.errors import VLBridgeError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="the small synthetic world: generate its images, captions and questions")
    world_sub = world.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = world_sub.add_parser("generate", help="write the world's splits (train, val, test, comp) under a folder",
                               description="Render scenes of coloured shapes with captions and VQAv2-style questions; "
                                           "the same seed writes the same files.")
    gen.add_argument("--out", required=True, metavar="DIR", help="an empty or new folder (or a world written before)")
    gen.add_argument("--seed", type=int, default=None, help="default 0")
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test"), ("comp", "compositional test")):
        gen.add_argument(f"--{split}", type=int, default=None, metavar="N", help=f"{what} images")
    gen.add_argument("--image-size", type=int, default=None, metavar="PX", help="image side in pixels (default 64)")
    gen.add_argument("--json", action="store_true", help="print the manifest as JSON")
    gen.set_defaults(func=cmd_generate)


def _config(args: argparse.Namespace):
    """A WorldConfig of the given flags (the rest default); bad values are user errors."""
    from pydantic import ValidationError

    from vlbridge.world import WorldConfig

    given = {"seed": args.seed, "train": args.train, "val": args.val, "test": args.test, "comp": args.comp, "image_size": args.image_size}
    try:
        return WorldConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
                             for e in exc.errors())
        raise VLBridgeError(f"invalid world settings: {problems}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from vlbridge.world import generate_world

    config = _config(args)
    start = time.perf_counter()
    manifest = generate_world(args.out, config)
    seconds = time.perf_counter() - start
    if args.json:
        print_json(manifest)
        return 0
    rows = [[split, str(s["images"]), str(s["captions"]), str(s["questions"]), str(s["held_out_objects"])]
            for split, s in manifest["stats"].items()]
    print_table(rows, ["split", "images", "captions", "questions", "held-out objects"])
    print(f"wrote the world (seed {config.seed}, {config.image_size} px) to {args.out} in {seconds:.1f} s")
    return 0
