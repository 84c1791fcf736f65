"""The frozen-feature cache: the encoder is frozen, so its outputs can be computed once and reused.

`vlbridge cache-features` (see `cache_build.build_cache`) runs the encoder over a dataset with the
**eval transform** (resize to S x S, or shorter side then centre crop for encoders that ask;
normalise: no random crop, no flip) and stores the `(N, tokens, width)` outputs as sharded
safetensors files plus a `manifest.json` that binds them to the encoder: plugin, validated
options, output shape, preprocessing and a sha256 of its weights. Training then
reads the cache (`cache_dataset.FeatureDataset`) and batches carry `image_embeds` instead of
`pixel_values`, so the objectives skip the encoder.

This module holds what both sides share: the manifest, the encoder's identity and `verify_cache`,
which refuses a cache that another encoder, other options or other weights produced.

Weights checksum: sha256 over the encoder's state dict (each tensor's name, dtype, shape and bytes,
in name order). It identifies what the encoder computes with, wherever the weights came from, at the
cost of hashing them once per build and once per dataset opened for training: measured ~0.95 GB/s
on one core of the 2-vCPU dev machine, i.e. ~2 s for EVA ViT-g in fp16 (1.97 GB), ~4 s in fp32, and
nothing for tiny encoders. (Hashing the checkpoint files instead would not be cheaper: a
transformers BLIP-2 directory also holds the LLM.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlbridge.errors import CacheWarning, InputFileError, VLBridgeError  # noqa: F401 (CacheWarning: imported from here too)
from vlbridge.files.userfiles import read_json

if TYPE_CHECKING:
    import torch

    from vlbridge.assemblies.assembly import Assembly

MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = "features-{:05d}.safetensors"
SHARD_GLOB = "features-*.safetensors"
TENSOR_NAME = "image_embeds"
FORMAT = "vlbridge-feature-cache"
StorageDtype = Literal["fp16", "bf16", "fp32"]
ImageId = Union[int, str]
WEIGHTS_METHOD = "sha256 over the encoder's state dict: name, dtype, shape and bytes of each tensor, in name order"
IMAGE_READING = "upright, transparency on white"  # how vlbridge.parts.images decodes files (EXIF orientation applied)


class CacheError(VLBridgeError):
    """A feature cache that cannot be used as asked: missing, corrupt, or built for another encoder."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessInfo(Strict):
    """The eval transform the features were computed with (the encoder's declared Preprocess)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str = "squash"  # absent from manifests written before centre-cropping encoders existed
    resize_size: int | None = None
    crop_offset: str = "round"  # absent from manifests written before transformers' floor crop was followed
    pad_to_square: tuple[int, int, int] | None = None  # absent from manifests written before encoders could pad
    transform: Literal["eval"] = Field("eval", description="pad to a square (with pad_to_square), resize (squash, or "
                                       "shortest side then centre-crop) to image_size x image_size and normalise; no augmentation")


class EncoderIdentity(Strict):
    """Everything that decides what the encoder outputs for a given image."""

    name: str
    plugin: str
    options: dict[str, Any]
    num_tokens: int
    width: int
    preprocess: PreprocessInfo
    weights_sha256: str
    weights_method: str = WEIGHTS_METHOD


class ShardEntry(Strict):
    """One safetensors file: `rows` images, their ids and names (as the annotations write them)."""

    file: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    image_ids: list[ImageId]
    names: list[str]
    stamps: list[list[int] | None] | None = None  # per row: [bytes, mtime_ns] of the image file (None: a tar member); None: not recorded


def file_stamp(path: str | Path) -> list[int]:
    """[size in bytes, modification time in ns] of an image file: what a cache records to notice that
    an image was replaced after its features were computed (as make and HF datasets do)."""
    found = Path(path).stat()
    return [found.st_size, found.st_mtime_ns]


def stamp_or_absent(path: str | Path) -> list[int]:
    """`file_stamp`, or [] when there is no such file: what a skipped image's file is compared by."""
    try:
        return file_stamp(path)
    except OSError:
        return []


class SkippedImage(Strict):
    """An image that could not be decoded when the cache was built (its captions are skipped too)."""

    image_id: ImageId
    name: str
    reason: str
    stamp: list[int] | None = None  # [bytes, mtime_ns] of its file then, [] if there was none; None: a tar stream, or not recorded


class TarShard(Strict):
    """A local tar shard the cache read: its identity as image ids hold it, and its content, by which a
    shard moved or renamed since is found again."""

    shard: str
    bytes: int = Field(ge=0)
    sha256: str


class Source(Strict):
    """One dataset the cache was built from: its data config, and the YAML file it came from if any."""

    file: str | None = None
    config: dict[str, Any]

    def arguments(self) -> str:
        """The cache-features arguments that name this dataset again."""
        if self.file is not None:
            return f"--data {self.file}"
        paths = " ".join(self.config.get("paths", []))
        root = f" --image-root {self.config['image_root']}" if self.config.get("image_root") else ""
        return f"--format {self.config.get('format')} --paths {paths}{root}"


class Manifest(Strict):
    """manifest.json: written last, so its presence means every shard it lists is complete."""

    format: Literal["vlbridge-feature-cache"] = FORMAT
    version: Literal[1] = 1
    encoder: EncoderIdentity
    dtype: StorageDtype
    shard_size: int = Field(ge=1)
    rows: int = Field(ge=0)
    shards: list[ShardEntry]
    skipped: list[SkippedImage] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list, description="the datasets it was built from")
    assembly: str = Field("", description="the assembly it was built with (for the rebuild command in errors)")
    tar_ids: Literal["key", "shard:key", "escaped-shard:key"] = Field(
        "key", description="what a tar sample's image id is: 'escaped-shard:key' (its shard, '%' and ':' percent-escaped, and "
        "key); 'shard:key' (caches before: the shard as is, so ':' made ids ambiguous; read by translating ids); 'key' (absent: "
        "caches before that) let equal keys of two shards share features")
    tar_shards: list[TarShard] = Field(default_factory=list, description="the local tar shards it read, by content "
                                       "(empty: none, or a cache built before shards were recorded)")
    image_reading: Literal["as stored", "upright, transparency on white"] = Field(
        "as stored", description="how its images were decoded: 'as stored' (absent: caches before) ignored EXIF orientation and "
                                 "dropped transparency, as vlbridge no longer does")


# -- identity -----------------------------------------------------------------------------------
def weights_sha256(module: "torch.nn.Module") -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes; name order). See the module doc for cost."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def encoder_identity(assembly: "Assembly", weights: str) -> EncoderIdentity:
    """The identity of the assembly's encoder, given the sha256 of its built weights."""
    plan = assembly.plan
    p = plan.preprocess
    return EncoderIdentity(
        name=plan.encoder.name, plugin=plan.encoder.plugin, options=dict(plan.encoder.options),
        num_tokens=plan.encoder_out.num_tokens, width=plan.encoder_out.width,
        preprocess=PreprocessInfo(image_size=p.image_size, mean=p.mean, std=p.std, interpolation=p.interpolation,
                                  resize_mode=p.resize_mode, resize_size=p.resize_size, crop_offset=p.crop_offset,
                                  pad_to_square=p.pad_to_square),
        weights_sha256=weights,
    )


def build_encoder(assembly: "Assembly", device: "str | torch.device | None" = None) -> "torch.nn.Module":
    """The assembly's frozen encoder alone, built exactly as `vlbridge.build` builds it (same seed)."""
    from vlbridge.modeling.factory import _build_frozen  # the one place frozen parts are built (fixed init seed)

    encoder = _build_frozen(assembly.encoder)
    return encoder.to(device) if device is not None else encoder


def manifest_json(manifest: Manifest) -> str:
    """The manifest as JSON, one line per shard (and tar shard) so that a cache of 100k images stays readable."""
    data = manifest.model_dump(mode="json")
    lists = {name: data.pop(name) for name in ("tar_shards", "shards")}
    head = json.dumps(data, indent=1)[:-2]
    for name, rows in lists.items():
        head += f',\n "{name}": [' + ",".join(f"\n  {json.dumps(row)}" for row in rows) + ("\n ]" if rows else "]")
    return head + "\n}\n"


# -- reading the manifest -----------------------------------------------------------------------
def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a cache directory, or a CacheError saying what is there instead."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST_FILE
    if directory.exists() and not directory.is_dir():
        raise CacheError(f"feature cache {str(directory)!r} is a file; give the folder vlbridge cache-features --out wrote")
    if not directory.is_dir():
        raise CacheError(f"feature cache {str(directory)!r} does not exist; build it with vlbridge cache-features --out {directory}")
    if not path.is_file():
        partial = sorted(p.name for p in directory.glob(SHARD_GLOB))
        why = (f"it holds {len(partial)} shard file(s) but no {MANIFEST_FILE}: its build was interrupted; rerun the same "
               "vlbridge cache-features command to resume it") if partial else f"it has no {MANIFEST_FILE}"
        raise CacheError(f"{str(directory)!r} is not a complete feature cache: {why}")
    try:
        return Manifest.model_validate(read_json(path, "feature-cache manifest", top=dict))
    except InputFileError as exc:
        raise CacheError(f"{path} cannot be read as a manifest ({exc.problem}); rebuild the cache with vlbridge cache-features "
                         "--overwrite") from None
    except ValidationError as exc:
        first = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise CacheError(f"{path} is not a vlbridge feature-cache manifest ({first}); rebuild it with vlbridge cache-features --overwrite") from None


# -- verification -------------------------------------------------------------------------------
def identity_problems(cached: EncoderIdentity, current: EncoderIdentity, *, weights: bool = True) -> list[str]:
    """What differs between the encoder a cache was built with and the current one, in words."""
    if cached.name != current.name:
        return [f"encoder: the cache holds features of {cached.name!r}, the assembly uses {current.name!r}"]
    problems = [f"encoder option {key}: {cached.options.get(key)!r} in the cache, {current.options.get(key)!r} now"
                for key in sorted({*cached.options, *current.options}) if cached.options.get(key) != current.options.get(key)]
    if (cached.num_tokens, cached.width) != (current.num_tokens, current.width):
        problems.append(f"encoder output: {cached.num_tokens} tokens x {cached.width} in the cache, {current.num_tokens} x {current.width} now")
    for field in ("image_size", "mean", "std", "interpolation", "resize_mode", "resize_size", "crop_offset", "pad_to_square"):
        was, now = getattr(cached.preprocess, field), getattr(current.preprocess, field)
        if was != now:
            problems.append(f"preprocessing {field}: {was} in the cache, {now} now")
    if weights and cached.weights_sha256 != current.weights_sha256:
        problems.append(f"encoder weights: sha256 {cached.weights_sha256[:12]}... in the cache, {current.weights_sha256[:12]}... now "
                        "(other pretrained weights, or a changed file)")
    return problems


def verify_cache(manifest: Manifest, assembly: "Assembly", *, encoder: "torch.nn.Module | None" = None,
                 weights: bool = True, directory: str | Path = "DIR") -> None:
    """Refuse a stale cache: raise CacheError naming each difference from the assembly's encoder and
    the command that rebuilds it. `encoder`: the already built encoder (else it is built, on CPU,
    to hash its weights); `weights=False` skips the weights check (options and shapes only)."""
    digest = ""
    if weights:
        digest = weights_sha256(encoder if encoder is not None else build_encoder(assembly))
    problems = identity_problems(manifest.encoder, encoder_identity(assembly, digest), weights=weights)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise CacheError(f"feature cache {str(directory)!r} was built for another encoder than assembly {assembly.name!r}:\n"
                         f"{listed}\nRebuild it for this assembly: {rebuild_command(manifest, assembly, directory)}")


def rebuild_command(manifest: Manifest, assembly: "Assembly | None" = None, directory: str | Path = "DIR") -> str:
    """The cache-features command line that would rebuild a cache (data from its manifest when known)."""
    name = assembly_label(assembly) if assembly is not None else (manifest.assembly or "ASSEMBLY")
    data = " ".join(source.arguments() for source in manifest.sources) or "--data DATA.yaml"
    return f"vlbridge cache-features --assembly {name} {data} --out {directory} --overwrite"


def assembly_label(assembly: "Assembly") -> str:
    """What `--assembly` takes to name this assembly again: the preset name or the YAML path."""
    return assembly.source.removeprefix("preset ").strip("'")


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (a shard): written into the manifest by the builder, checked on demand by
    `FeatureStore.verify_checksums` (opening a cache checks sizes and headers only: hashing reads it all)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
