"""`vlbridge cache-features`: run the frozen encoder once over a dataset and store its outputs, so
that training reads features (`data.features: DIR` in a training config) instead of images."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.cli.argtypes import non_negative_int, positive_int
from vlbridge.cli.model_source import add_random_weights_argument
from vlbridge.cli.output import print_json
from vlbridge.errors import VLBridgeError
from vlbridge.train.cache import MANIFEST_FILE, SkippedImage

SHOW_SKIPPED = 5  # skipped images named on the terminal; the manifest keeps them all

DESCRIPTION = """\
Compute the frozen image encoder's outputs (N, tokens, width) once for every distinct image of the
given datasets and store them under DIR as safetensors shards plus manifest.json (encoder, options,
weights sha256, preprocessing, image ids). Images go through the encoder's EVAL transform (resize and
normalise): no random crop, no flip, so training from the cache trains without image augmentation.
Give --data once per dataset (train and eval) to serve both from one cache. An interrupted run
resumes when rerun with the same arguments; --overwrite rebuilds a finished cache from scratch."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-features", help="store the frozen encoder's outputs for a dataset (eval transform, no augmentation)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assembly", "-a", required=True, metavar="PRESET_OR_YAML", help="the assembly whose encoder to run")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", action="append", metavar="DATA.yaml", help="a data config (format, paths, ...); repeat for more datasets")
    data.add_argument("--format", choices=("coco", "jsonl", "webdataset", "vqa"), help="the data format, with --paths")
    p.add_argument("--paths", nargs="+", metavar="PATH", help="annotation files or tar shards (with --format)")
    p.add_argument("--image-root", metavar="DIR", help="folder relative image paths are under (with --format)")
    p.add_argument("--split", help="coco: the Karpathy split; vqa: the image subtype (with --format)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the cache directory")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder forward (default 64)")
    p.add_argument("--device", default="cpu", help="torch device for the encoder (default cpu)")
    add_random_weights_argument(p)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="storage precision (default fp16: half the disk)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard file (default 1024)")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="image-decoding worker processes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished cache in DIR (rebuilt from scratch)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_cache_features)


def _sources(args: argparse.Namespace) -> list:
    if args.data:
        extra = [flag for flag, value in (("--paths", args.paths), ("--image-root", args.image_root), ("--split", args.split)) if value]
        if extra:
            raise VLBridgeError(f"{', '.join(extra)} go with --format; with --data, put them in the data config")
        return list(args.data)
    if not args.paths:
        raise VLBridgeError(f"--format {args.format} needs --paths: the annotation files or tar shards to read")
    if args.split and args.format not in ("coco", "vqa"):
        raise VLBridgeError(f"--split picks a split of a coco (Karpathy) or vqa file; --format {args.format} has none, drop it")
    config = {"format": args.format, "paths": args.paths}
    config.update({key: value for key, value in (("image_root", args.image_root), ("split", args.split)) if value})
    return [config]


def _settings(args: argparse.Namespace):
    from vlbridge.parts.devices import resolve_device
    from vlbridge.train.cache_build import BuildSettings

    device = str(resolve_device(args.device))  # the rule every command shares
    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
        if value < 1:
            raise VLBridgeError(f"{flag} must be at least 1, got {value}")
    if args.num_workers < 0:
        raise VLBridgeError(f"--num-workers must be 0 or more, got {args.num_workers}")
    return BuildSettings(batch_size=args.batch_size, device=device, dtype=args.dtype,
                         shard_size=args.shard_size, num_workers=args.num_workers)


def cmd_cache_features(args: argparse.Namespace) -> int:
    assembly = load_assembly(args.assembly)  # torch-free: a misspelt preset is reported before torch loads
    from vlbridge.train.cache_build import build_cache

    sources, settings = _sources(args), _settings(args)
    started = time.monotonic()
    log = None if args.json else (lambda message: print(f"vlbridge cache-features: {message}", file=sys.stderr, flush=True))
    manifest = build_cache(assembly, sources, args.out, settings, overwrite=args.overwrite, log=log,
                           random_weights=args.random_weights)  # checks the encoder's weights first
    seconds = time.monotonic() - started
    size = sum(shard.bytes for shard in manifest.shards)
    summary = {"out": args.out, "images": manifest.rows, "skipped": len(manifest.skipped), "shards": len(manifest.shards),
               "bytes": size, "dtype": manifest.dtype, "encoder": manifest.encoder.name,
               "shape": [manifest.encoder.num_tokens, manifest.encoder.width],
               "weights_sha256": manifest.encoder.weights_sha256, "seconds": round(seconds, 3),
               "skipped_images": [{"name": image.name, "reason": image.reason} for image in manifest.skipped]}
    if args.json:
        print_json(summary)
    else:
        skipped = f", {len(manifest.skipped)} unreadable skipped" if manifest.skipped else ""
        print(f"cached {manifest.rows} images{skipped} in {len(manifest.shards)} shards ({size / 2**20:.1f} MiB, {manifest.dtype}) "
              f"-> {args.out}\nencoder {manifest.encoder.name}: {manifest.encoder.num_tokens} tokens x {manifest.encoder.width}, "
              f"weights sha256 {manifest.encoder.weights_sha256[:16]}...; {seconds:.1f} s\n"
              f"train from it with `data: {{features: {args.out}}}` in the training config (eval transform: no augmentation)")
        print(skipped_lines(manifest.skipped, Path(args.out) / MANIFEST_FILE), end="")
    return 0


def skipped_lines(skipped: Sequence[SkippedImage], manifest: Path, show: int = SHOW_SKIPPED) -> str:
    """Which images the cache left out and why (the first `show`; the manifest lists every one), so
    that a count alone does not stand for them: their captions train on nothing from this cache."""
    lines = [f"skipped {image.name}: {image.reason}\n" for image in skipped[:show]]
    if len(skipped) > show:
        lines.append(f"... and {len(skipped) - show} more (all of them under 'skipped' in {manifest})\n")
    return "".join(lines)
