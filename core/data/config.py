"""`DataConfig`: one dataset as the trainer's and `vlbridge eval`'s YAML declare it. Imports no torch.

Embed it in a larger pydantic config (errors then carry the full YAML path), or validate a mapping
on its own with `load_data_config(raw, where="data.train")`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlbridge.data.records import DataConfigError
from vlbridge.data.shards import is_url
from vlbridge.data.vqa import DEFAULT_IMAGE_PATTERN
from vlbridge.files.config_fields import PathText, StrictNumbers, did_you_mean, unusable_path

Format = Literal["coco", "vqa", "webdataset", "jsonl"]


def _data_path(value: str) -> str:
    """A data path as PathText checks it, except that a URL or `pipe:` command (each of its '::'-joined
    parts) may be of any length: a signed object-store URL's query alone runs past a file name's 255 bytes."""
    for part in value.split("::"):
        problem = unusable_path(part, name_lengths=not is_url(part))
        if problem:
            raise ValueError(problem)
    return value


DataPath = Annotated[str, AfterValidator(_data_path)]


class DataConfig(StrictNumbers):
    """Which files, in which format, and how samples are prepared."""

    model_config = ConfigDict(extra="forbid")
    format: Format = Field(description="coco (also Flickr30k; LAVIS, official COCO or Karpathy JSON), vqa (VQAv2), webdataset (tar shards), jsonl")
    paths: list[DataPath] = Field(min_length=1, description="caption JSON, JSONL or VQA questions files; or tar shards (paths, globs, 'x-{0000..0009}.tar')")
    vqa_annotations: list[PathText] | None = Field(None, description="VQAv2 annotations (answers) files, one per questions file; omit for test splits")
    image_root: PathText | None = Field(None, description="folder that relative image paths are under; default: each annotation file's folder")
    split: str | None = Field(None, description=(
        "coco: the split of a Karpathy dataset_*.json (train includes restval); "
        "vqa: the image subtype, e.g. val2014 (default: the questions file's data_subtype)"
    ))
    image_pattern: str = Field(DEFAULT_IMAGE_PATTERN, description="vqa: image file name from {split} and {image_id}")
    max_words: int = Field(50, ge=1, description="captions and questions are cut to this many words (BLIP: 50), cleaned or not")
    clean_text: bool = Field(True, description="apply BLIP's caption / question cleaning (lowercase, strip punctuation)")
    strict: bool = Field(False, description="an unreadable image or incomplete sample is an error instead of being skipped and counted")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")
    shuffle: bool | None = Field(None, description="shuffle each epoch (seeded); default: when training")
    shuffle_buffer: int = Field(1000, ge=0, description="webdataset: samples held to shuffle within shards (0: shards only)")
    resample: bool = Field(False, description=(
        "webdataset, training: draw shards with replacement, seeded per rank and worker, without end (the run stops on steps); "
        "ranks are not given disjoint shards"
    ))
    limit: int | None = Field(None, ge=1, description="use only the first N samples (images, when evaluating captions); not for webdataset")

    @field_validator("paths", "vqa_annotations", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits_format(self) -> "DataConfig":
        conflicts = self.conflicts()
        if conflicts:
            raise ValueError("\n".join(f"{field}: {message}" for field, message in conflicts))
        return self

    def _chosen(self, field: str) -> bool:
        """Set to something other than its default: a written-out default (a dumped config, every
        default filled in) is no choice and conflicts with nothing."""
        return getattr(self, field) != type(self).model_fields[field].default

    def conflicts(self) -> list[tuple[str, str]]:
        """(field, why) for each option that the format does not use or that contradicts another."""
        found = []
        if self.vqa_annotations is not None and self.format != "vqa":
            found.append(("vqa_annotations", f"only read with format 'vqa', not {self.format!r}"))
        if self.vqa_annotations is not None and self.format == "vqa" and len(self.vqa_annotations) != len(self.paths):
            found.append(("vqa_annotations", f"give one annotations file per questions file ({len(self.paths)}), got {len(self.vqa_annotations)}"))
        if self.split is not None and self.format not in ("coco", "vqa"):
            found.append(("split", f"only used by formats coco and vqa, not {self.format!r}"))
        if self._chosen("image_pattern") and self.format != "vqa":
            found.append(("image_pattern", f"only used by format 'vqa', not {self.format!r}"))
        if self.format == "webdataset" and self.image_root is not None:
            found.append(("image_root", "not used by format 'webdataset' (the images are inside the shards)"))
        if self.format == "webdataset" and self.limit is not None:
            found.append(("limit", "not supported for webdataset; list fewer shards instead"))
        if self.format != "webdataset" and self.resample:
            found.append(("resample", f"only used by format 'webdataset', not {self.format!r}"))
        if self.format != "webdataset" and self._chosen("shuffle_buffer"):
            found.append(("shuffle_buffer", f"only used by format 'webdataset', not {self.format!r}"))
        return found


def load_data_config(raw: Any, where: str = "data") -> DataConfig:
    """Validate one data mapping; a DataConfigError lists every problem with its YAML path under `where`."""
    if isinstance(raw, DataConfig):
        return raw
    if not isinstance(raw, dict):
        raise DataConfigError(where, [f"{where}: expected a mapping with format and paths, got {type(raw).__name__}"])
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as exc:
        raise DataConfigError(where, _problems(exc, where)) from exc


def _problems(exc: ValidationError, where: str) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        path = f"{where}.{loc}" if loc else where
        if err["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key; valid keys are: {', '.join(DataConfig.model_fields)}"
                            f"{did_you_mean(err['loc'][-1], DataConfig.model_fields)}")
        elif not loc and err["type"] == "value_error":  # the cross-field checks: one "field: why" per line
            message = err["msg"].removeprefix("Value error, ")
            problems.extend(f"{where}.{line}" for line in message.splitlines())
        else:  # a validator's own message says what it got (a path too long for the file system: not all of it)
            got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") and "input" in err else ""
            problems.append(f"{path}: {err['msg'].removeprefix('Value error, ')}{got}")
    return problems
