"""Building a frozen-feature cache (`vlbridge cache-features`): run the frozen encoder once over
every distinct image of one or more datasets, with the eval transform, and store its outputs.

Layout of the output directory: `features-00000.safetensors`, ... (`shard_size` images each, one
tensor `image_embeds` of shape (rows, tokens, width) in fp16, bf16 or fp32) and `manifest.json`.

Interruption: each shard is written atomically (beside, then renamed) with a header that records
the build's fingerprint (encoder identity including its weights' sha256, dtype, shard size) and the
images it was planned for; the manifest is written last. A build without a manifest therefore
**resumes**: rerunning the same command keeps every complete shard whose header matches and
recomputes only the rest. A directory with a manifest is a finished cache; it is refused unless
`overwrite=True`, which deletes its files first and **restarts** from scratch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.files.atomic import atomic_write, atomic_write_text
from vlbridge.data.build import make_loader
from vlbridge.data.config import DataConfig, load_data_config
from vlbridge.data.datasets import RecordDataset
from vlbridge.data.records import DataError, ImageText, Skipped
from vlbridge.data.transforms import eval_transform
from vlbridge.errors import DataWarning
from vlbridge.parts.freeze import torch_dtype
from vlbridge.assemblies.reachability import check_reachable
from vlbridge.train.config import data_file_problems
from vlbridge.train.cache import (IMAGE_READING, MANIFEST_FILE, SHARD_GLOB, SHARD_PATTERN, TENSOR_NAME, CacheError, EncoderIdentity,
                                  Manifest, ShardEntry, SkippedImage, Source, StorageDtype, assembly_label, build_encoder,
                                  encoder_identity, file_sha256, manifest_json, read_manifest, stamp_or_absent, weights_sha256)
from vlbridge.train.cache_dataset import image_place, iter_samples, portable_name, stamped_file
from vlbridge.train.cache_tars import record_tar_shards
from vlbridge.files.userfiles import read_yaml

Log = Callable[[str], None]
HEADER_KEY = "vlbridge_cache"  # the shard header's one metadata entry: JSON of what a resumed build checks and reuses


@dataclass(frozen=True)
class BuildSettings:
    """How a cache is computed and stored; dtype and shard_size are part of each shard's fingerprint,
    the rest only changes the speed."""

    batch_size: int = 64
    device: str = "cpu"
    dtype: StorageDtype = "fp16"
    shard_size: int = 1024
    num_workers: int = 2


# -- sources and images --------------------------------------------------------------------------
def _other_config(source: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """(kind, the sections holding its datasets) for a training or compare config given as a data
    config (the file a user has at hand); None for anything else. Named as such, not as one
    'unknown key' line per setting."""
    if "format" in source:
        return None
    if isinstance(source.get("data"), dict):
        return "training", [f"data.{name}" for name in ("train", "eval") if isinstance(source["data"].get(name), dict)] or ["its data.train"]
    if isinstance(source.get("runs"), list):
        return "compare", [name for name in ("stage1_data", "stage2_data") if isinstance(source.get(name), dict)] or ["its stage1_data"]
    return None


def load_sources(sources: Sequence[DataConfig | Mapping[str, Any] | str | Path]) -> list[tuple[DataConfig, Source]]:
    """Data configs from objects, mappings or YAML files (each a DataConfig mapping)."""
    loaded = []
    for i, source in enumerate(sources):
        file = None
        if isinstance(source, (str, Path)):
            file, source = str(source), read_yaml(source, "data config", top=dict)
            other = _other_config(source)
            if other is not None:
                kind, sections = other
                raise CacheError(f"data config {file!r} is a {kind} config; --data takes one dataset's settings (format, paths, "
                                 f"image_root, ...): save {' and '.join(sections)} as a file of its own each and give "
                                 "one --data per file, or give --format and --paths")
        config = load_data_config(source, where=file or f"data[{i}]")
        loaded.append((config, Source(file=file, config=config.model_dump(mode="json", exclude_defaults=True))))
    if not loaded:
        raise CacheError("no data to cache: give at least one dataset (--data DATA.yaml, or --format and --paths)")
    return loaded




def unique_images(sources: Sequence[tuple[DataConfig, Source]]) -> Iterator[ImageText]:
    """Each distinct image once (first-seen order), keyed by image id; an id naming two images is an
    error: two names, or one name in two places (the same relative path under two folders, the same
    image in two places), whose features would otherwise be one image's. (Tar samples' ids hold their shard.)"""
    seen: dict[Any, str] = {}
    skipped, first_skipped = 0, None
    for config, source in sources:
        where = source.file or "data"
        for sample in iter_samples(config, where, keep_bytes=True):
            if isinstance(sample, Skipped):
                skipped, first_skipped = skipped + 1, first_skipped or sample  # no image or caption: nothing to encode
                continue
            place = image_place(sample.image)
            known = seen.get(sample.image_id)
            if known is None:
                seen[sample.image_id] = place
                yield ImageText(sample.image, "", sample.image_id)
            elif known != place:
                raise DataError(f"{where}: image id {sample.image_id!r} names two images, {known!r} and {place!r}; "
                                "the cache finds features by image id, so each id must belong to one image (give the "
                                "annotations distinct image_id values)")
    if first_skipped is not None and not seen:  # say why, rather than only that there is no image to cache
        raise DataError(f"every sample was skipped ({skipped}), so there is no image to cache; the first: "
                        f"{first_skipped.name}: {first_skipped.reason}")


def chunked(items: Iterable[ImageText], size: int) -> Iterator[list[ImageText]]:
    chunk: list[ImageText] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- the directory --------------------------------------------------------------------------------
def prepare_directory(out: Path, overwrite: bool) -> None:
    """Refuse a finished cache unless overwriting (then delete it); drop temp files of a killed run.
    A directory holding anything a cache does not write (a world, a run, a cache of another kind) is
    refused even with `overwrite`: overwriting deletes only a cache's own files."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not _cache_file(p.name))
    if foreign:
        raise CacheError(f"{str(out)!r} holds files that a feature cache does not write ({', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}); give --out a new or empty directory (or an existing cache)")
    if (out / MANIFEST_FILE).is_file():
        if not overwrite:
            old = read_manifest(out)
            raise CacheError(f"{str(out)!r} already holds a feature cache ({old.rows} images of encoder {old.encoder.name!r}); "
                             "pass --overwrite to rebuild it from scratch, or choose another --out")
        (out / MANIFEST_FILE).unlink()  # first: a crash below must not leave a manifest over missing shards
        for shard in out.glob(SHARD_GLOB):
            shard.unlink()
    for leftover in [*out.glob(".features-*.tmp"), *out.glob(f".{MANIFEST_FILE}.*.tmp")]:
        leftover.unlink(missing_ok=True)


def _cache_file(name: str) -> bool:
    """Whether a cache build writes a file of this name (manifest, shards, their temporary files)."""
    return (name == MANIFEST_FILE or fnmatch.fnmatchcase(name, SHARD_GLOB) or fnmatch.fnmatchcase(name, ".features-*.tmp")
            or fnmatch.fnmatchcase(name, f".{MANIFEST_FILE}.*.tmp"))


def fingerprint(identity: EncoderIdentity, settings: BuildSettings) -> str:
    payload = {"encoder": identity.model_dump(mode="json"), "dtype": settings.dtype, "shard_size": settings.shard_size,
               "image_reading": IMAGE_READING}  # a shard an older vlbridge decoded otherwise is not reused
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# -- shards ---------------------------------------------------------------------------------------
def reuse_shard(path: Path, fingerprint_: str, planned: list[list[Any]]) -> tuple[ShardEntry, list[SkippedImage]] | None:
    """A complete shard of an interrupted build of the same cache, or None (then it is rewritten)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = json.loads((handle.metadata() or {})[HEADER_KEY])
            rows = handle.get_slice(TENSOR_NAME).get_shape()[0]
        if meta["fingerprint"] != fingerprint_ or meta["planned"] != planned:
            return None
        ids, names, stamps = meta["image_ids"], meta["names"], meta["stamps"]
        skipped = [SkippedImage(**s) for s in meta["skipped"]]
    except Exception:  # a damaged or foreign file is simply rewritten
        return None
    if rows != len(ids) or (stamps is not None and len(stamps) != rows):
        return None
    entry = ShardEntry(file=path.name, rows=rows, bytes=path.stat().st_size, sha256=file_sha256(path), image_ids=ids, names=names,
                       stamps=stamps)
    return entry, skipped


def encode_chunk(encoder: torch.nn.Module, chunk: list[ImageText], preprocess: Any, settings: BuildSettings,
                 strict: bool, stamps: list[list[int] | None]) -> tuple[torch.Tensor, list[int], list[SkippedImage]]:
    """(rows, tokens, width) features of the chunk's readable images, their chunk positions, the skipped
    (with their files' `stamps`, so that training notices one that is readable now)."""
    with warnings.catch_warnings():  # which ids share a file matters to training, which says so; the cache encodes each id's
        warnings.simplefilter("ignore", DataWarning)
        dataset = RecordDataset(chunk, eval_transform(preprocess), strict=strict, shuffle=False)
    loader = make_loader(dataset, settings.batch_size, num_workers=settings.num_workers)
    storage = torch_dtype(settings.dtype)
    parts, positions, skipped = [], [], []
    for batch in loader:
        skipped += [SkippedImage(image_id=chunk[s.index].image_id, name=portable_name(chunk[s.index].image), reason=s.reason,
                                 stamp=stamps[s.index])
                    for s in batch["skipped"]]
        if len(batch["index"]) == 0:
            continue
        with torch.inference_mode():  # as VLBridgeModel.encode_images: the encoder's output, in fp32
            features = encoder(batch["pixel_values"].to(settings.device)).float()
        stored = features.to(storage).cpu()
        if not torch.isfinite(stored).all():
            first = chunk[int(batch["index"][0])].image.name
            raise CacheError(f"encoder outputs for the batch starting at image {first!r} are not finite in {settings.dtype} "
                             f"(largest |value| {features.abs().max().item():.4g}); store them as --dtype fp32 or bf16")
        parts.append(stored)
        positions += batch["index"].tolist()
    empty = torch.empty(0, 0, 0, dtype=storage)
    return (torch.cat(parts) if parts else empty), positions, skipped


def write_shard(path: Path, encoder: torch.nn.Module, chunk: list[ImageText], preprocess: Any, identity: EncoderIdentity,
                settings: BuildSettings, fingerprint_: str, strict: bool) -> tuple[ShardEntry, list[SkippedImage]]:
    """Encode a chunk and write its shard atomically, with the header that lets a rerun reuse it."""
    stamps_before = chunk_stamps(chunk)
    features, positions, skipped = encode_chunk(encoder, chunk, preprocess, settings, strict, stamps_before)
    if features.numel() == 0:
        features = torch.empty(0, identity.num_tokens, identity.width, dtype=torch_dtype(settings.dtype))
    ids = [chunk[p].image_id for p in positions]
    names = [portable_name(chunk[p].image) for p in positions]
    stamps = [stamps_before[p] for p in positions]
    meta = {"fingerprint": fingerprint_, "planned": planned_keys(chunk), "image_ids": ids, "names": names,
            "skipped": [s.model_dump(mode="json") for s in skipped], "stamps": stamps}
    header = {HEADER_KEY: json.dumps(meta)}  # one key: safetensors writes several in a random order, so equal shards differed
    atomic_write(path, lambda tmp: save_file({TENSOR_NAME: features.contiguous()}, str(tmp), metadata=header))
    entry = ShardEntry(file=path.name, rows=len(ids), bytes=path.stat().st_size, sha256=file_sha256(path), image_ids=ids, names=names,
                       stamps=stamps)
    return entry, skipped


def chunk_stamps(chunk: list[ImageText]) -> list[list[int] | None]:
    """The [size, mtime_ns] of each image's file (a tar member's shard), taken before it is read (None
    for a stream that is no local file; [] for a file that cannot be stat'ed: its read fails and skips
    it, and a file there later differs from [])."""
    return [None if (stamped := stamped_file(item.image)) is None else stamp_or_absent(stamped) for item in chunk]


def planned_keys(chunk: list[ImageText]) -> list[list[Any]]:
    return [[item.image_id, portable_name(item.image)] for item in chunk]


# -- the build ------------------------------------------------------------------------------------
def build_cache(assembly: Assembly | str | Path | dict[str, Any], sources: Sequence[DataConfig | Mapping[str, Any] | str | Path],
                out: str | Path, settings: BuildSettings = BuildSettings(), *, overwrite: bool = False,
                log: Log | None = None, random_weights: bool = False) -> Manifest:
    """Cache the assembly's encoder outputs for every distinct image of `sources` under `out`
    (resuming an interrupted build there); returns the manifest, written last. The encoder's weights
    are checked as vlbridge.build checks them (`random_weights` as there) before `out` is touched."""
    assembly = assembly if isinstance(assembly, Assembly) else load_assembly(assembly)
    loaded = load_sources(sources)
    missing = [problem for config, source in loaded for problem in data_file_problems(config, source.file or "data")]
    if missing:  # said before the encoder loads (minutes for a real one) and before out is made
        raise CacheError("; ".join(missing))
    check_reachable(assembly, 1, random_weights=random_weights, only=("encoder",))  # the encoder alone is built
    out = Path(out).expanduser()
    prepare_directory(out, overwrite)
    encoder = build_encoder(assembly, settings.device)
    identity = encoder_identity(assembly, weights_sha256(encoder))
    print_ = log or (lambda message: None)
    stamp, strict = fingerprint(identity, settings), any(config.strict for config, _ in loaded)
    shards: list[ShardEntry] = []
    skipped: list[SkippedImage] = []
    started = time.monotonic()
    for index, chunk in enumerate(chunked(unique_images(loaded), settings.shard_size)):
        path = out / SHARD_PATTERN.format(index)
        reused = reuse_shard(path, stamp, planned_keys(chunk))
        entry, lost = reused or write_shard(path, encoder, chunk, assembly.plan.preprocess, identity, settings, stamp, strict)
        shards.append(entry)
        skipped += lost
        done = sum(s.rows for s in shards)
        print_(f"{entry.file}: {entry.rows} images{' (kept from the interrupted run)' if reused else ''}; "
               f"{done} so far, {done / max(time.monotonic() - started, 1e-9):.1f} images/s")
    if not shards:
        raise CacheError("the data holds no image to cache")
    if not any(s.rows for s in shards):
        names = ", ".join(f"{item.name} ({item.reason})" for item in skipped[:3])
        raise CacheError(f"none of the data's {len(skipped)} images could be read ({names}{', ...' if len(skipped) > 3 else ''}); "
                         "a cache without features would train nothing: fix the image paths (image_root) or the files")
    for stale in out.glob(SHARD_GLOB):  # shards of an earlier, longer interrupted build
        if stale.name not in {s.file for s in shards}:
            stale.unlink()
    manifest = Manifest(encoder=identity, dtype=settings.dtype, shard_size=settings.shard_size, rows=sum(s.rows for s in shards),
                        shards=shards, skipped=skipped, sources=[source for _, source in loaded], assembly=assembly_label(assembly),
                        tar_ids="escaped-shard:key", tar_shards=record_tar_shards([config for config, _ in loaded]),
                        image_reading=IMAGE_READING)
    atomic_write_text(out / MANIFEST_FILE, manifest_json(manifest))
    return manifest
