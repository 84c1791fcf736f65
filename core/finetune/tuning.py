"""What a model carries beyond its connector after fine-tuning, and how checkpoints keep it.

Two parts may differ from the sources the assembly names: the image encoder (trained whole or in
its last blocks, or restored from a run that trained it) and LoRA adapters on the LLM. The model
records them in `model.tuned`; a checkpoint stores them beside connector.safetensors:

- `encoder.safetensors`: only the encoder tensors that differ from the source (those trained or
  restored), in the dtype they trained in; checkpoint.json's `encoder` entry names the dtype.
- `lora.safetensors`: the adapters' tensors; checkpoint.json's `lora` entry holds r, alpha,
  dropout and target modules, enough to inject the same adapters again.

`restore_tuned` puts both back into a freshly built model, so `vlbridge.load(dir)` computes what the
saved model computed. A stage-1 model has no LLM, so it takes no adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from vlbridge.files.checkpoint import ExtraPart
from vlbridge.errors import WeightsError
from vlbridge.parts.freeze import DTYPES, torch_dtype
from vlbridge.finetune.lora import SETTINGS, add_lora, lora_parameters, resolve_settings
from vlbridge.files.weights import load_subset, read_tensors, require_path

ENCODER_FILE = "encoder.safetensors"
LORA_FILE = "lora.safetensors"


@dataclass
class Tuned:
    """The model's record of its fine-tuned parts (empty: the frozen bridge)."""

    encoder_names: set[str] = field(default_factory=set)  # encoder parameters that differ from the source
    encoder_dtype: str | None = None  # fp32 / bf16 / fp16 of the encoder they were trained in
    lora: dict[str, Any] | None = None  # the adapters' resolved settings (r, alpha, dropout, target_modules)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def tuned_parts(model: Any) -> list[ExtraPart]:
    """The model's fine-tuned tensors as checkpoint parts (none for a frozen bridge). Under FSDP every
    rank must call it: a restored tensor that is frozen in this run lies in a shard and is gathered whole."""
    parts, tuned = [], model.tuned
    if tuned.encoder_names:
        params = dict(model.encoder.named_parameters())
        tensors = {name: whole(params[name]) for name in sorted(tuned.encoder_names)}
        parts.append(ExtraPart("encoder", ENCODER_FILE, tensors, {"file": ENCODER_FILE, "tensors": len(tensors), "dtype": tuned.encoder_dtype}))
    if tuned.lora is not None and model.llm is not None:
        tensors = {name: whole(param) for name, param in lora_parameters(model.llm.model).items()}
        parts.append(ExtraPart("lora", LORA_FILE, tensors, {"file": LORA_FILE, "tensors": len(tensors), **tuned.lora}))
    return parts


def whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, detached: an FSDP shard (a DTensor; frozen tensors restored from an
    earlier run are sharded with the rest of their part) is all-gathered, a plain tensor is itself."""
    full = getattr(param, "full_tensor", None)
    return (full() if full is not None else param).detach()


def restore_tuned(model: Any, directory: str | Path, meta: Mapping[str, Any], *, shapes_only: bool = False) -> list[str]:
    """Put a checkpoint's encoder tensors and LoRA adapters (if it has them) into `model`, frozen;
    returns what was restored ("encoder", "lora"). The adapters need the LLM (stage 2). `shapes_only`
    (a model on the meta device): checked against the safetensors headers, no tensor data read."""
    directory, restored = Path(directory), []
    entry = meta.get("encoder")
    if entry:
        restore_encoder(model, directory / _file(entry, "encoder", directory), entry.get("dtype"), shapes_only)
        restored.append("encoder")
    entry = meta.get("lora")
    if entry and model.llm is not None:
        restore_lora(model, directory / _file(entry, "lora", directory), {key: entry.get(key) for key in SETTINGS}, shapes_only)
        restored.append("lora")
    return restored


def _file(entry: Any, key: str, directory: Path) -> str:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str):
        raise WeightsError(f"{directory}/checkpoint.json: {key!r} must be an object naming its tensors' file, got {entry!r}")
    return entry["file"]


def restore_encoder(model: Any, path: Path, dtype: str | None, shapes_only: bool = False) -> None:
    """Load trained encoder tensors (in the dtype they trained in) into the model's encoder."""
    tensors = read_tensors(require_path(path, "fine-tuned encoder tensors"), shapes_only=shapes_only)
    if dtype is not None:
        model.encoder.to(torch_dtype(dtype))
        model.tuned.encoder_dtype = dtype
    load_subset(model.encoder, tensors, str(path), expected=set(tensors))
    model.tuned.encoder_names |= set(tensors)


def restore_lora(model: Any, path: Path, settings: Mapping[str, Any], shapes_only: bool = False) -> None:
    """Inject adapters with the recorded settings (unless the same ones are there) and load them strictly."""
    llm_model = model.llm.model
    if model.tuned.lora is None:
        model.tuned.lora = add_lora(model.llm, settings, trainable=False)
    elif model.tuned.lora != resolve_settings(llm_model, settings):
        raise WeightsError(f"{path}: its LoRA adapters ({dict(settings)}) differ from those on the model ({model.tuned.lora})")
    tensors = read_tensors(require_path(path, "LoRA adapters"), shapes_only=shapes_only)
    load_subset(llm_model, tensors, str(path), expected=set(lora_parameters(llm_model)))
