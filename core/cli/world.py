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
    gen.add_argument("--out", required=True, metavar="DIR", help="an empty or new folder, or a world written before (its splits "
                     "are replaced, except those given size 0, which are kept)")
    gen.add_argument("--seed", type=int, default=None, help=f"default {_default('seed')}")
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test"), ("comp", "compositional test")):
        gen.add_argument(f"--{split}", type=int, default=None, metavar="N",
                         help=f"{what} images (default {_default(split)}; 0: none, or keep this split of the world in DIR)")
    gen.add_argument("--image-size", type=int, default=None, metavar="PX", help=f"image side in pixels (default {_default('image_size')})")
    gen.add_argument("--json", action="store_true", help="print the manifest as JSON")
    gen.set_defaults(func=cmd_generate)


def _default(field: str) -> object:
    """WorldConfig's own default, so the help cannot drift from it."""
    from vlbridge.world.config import WorldConfig

    return WorldConfig.model_fields[field].default


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
    if manifest["kept"]:
        kept = manifest["kept"]
        names = kept[0] if len(kept) == 1 else f"{', '.join(kept[:-1])} and {kept[-1]}"
        print(f"kept the {names} split{'s' if len(kept) > 1 else ''} of the world already there (given size 0); "
              "give them a size to regenerate them")
    return 0
