"""CLIP ViT-L checkpoints for the `clip-vit-l` encoder: reading and key conversion (pure functions).

Our tower is open_clip's `VisionTransformer`, so open_clip checkpoints (a full CLIP with `visual.*`
keys, or the vision tower alone) need only their `visual.` prefix removed. transformers'
`CLIPVisionModel` / `CLIPModel` checkpoints (LLaVA loads `openai/clip-vit-large-patch14-336` that
way) are converted by `convert_hf_clip_vision_state_dict`. Keys of other parts (the text tower,
`logit_scale`) are outside the vision namespace and are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vlbridge.errors import WeightsError
from vlbridge.files.userfiles import read_json
from vlbridge.files.weights import StateDict, read_hf_directory, read_tensors, require_path


# transformers CLIP vision name (after `vision_model.`) -> open_clip's; q/k/v are fused apart.
_HF_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^pre_layrnorm\.(weight|bias)$", r"ln_pre.\1"),
    (r"^post_layernorm\.(weight|bias)$", r"ln_post.\1"),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$", r"transformer.resblocks.\1.ln_\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"transformer.resblocks.\1.mlp.c_proj.\2"),
]]
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def is_hf_clip(state: StateDict) -> bool:
    return any(key.startswith("vision_model.embeddings.") or key.startswith("embeddings.patch_embedding") for key in state)


def convert_open_clip_vision_state_dict(state: StateDict) -> StateDict:
    """A full open_clip CLIP (`visual.*`) or a vision-tower state dict -> the tower's keys."""
    if any(key.startswith("visual.") for key in state):
        return {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    return dict(state)


def convert_hf_clip_vision_state_dict(state: StateDict) -> StateDict:
    """transformers CLIP vision keys (`vision_model.*` and `visual_projection`, or bare) -> open_clip's.

    q, k and v projections are fused into `attn.in_proj_*` in that order; `visual_projection.weight`
    `(E, W)` becomes `proj` `(W, E)`; the `position_ids` buffer is not a weight and is dropped.
    """
    has_prefix = any(key.startswith("vision_model.") for key in state)
    out: StateDict = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()  # (E, W) -> (W, E)
            continue
        if has_prefix and not key.startswith("vision_model."):
            continue  # the text tower, logit_scale, ...: not the encoder's
        key = key.removeprefix("vision_model.")
        if key == "embeddings.position_ids":
            continue
        qkv = _HF_QKV.match(key)
        if qkv:
            fused.setdefault((qkv[1], qkv[3]), {})[qkv[2]] = value
            continue
        out[_rename(key)] = value
    for (layer, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"layer {layer} has {kind}s for {sorted(parts)} only; q, k and v are all needed")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _rename(key: str) -> str:
    for pattern, replacement in _HF_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key  # unknown: passed through, so the strict load lists it


def read_hf_config(path: Path) -> dict | None:
    """The vision config of a transformers CLIP directory (None for a file or another directory)."""
    config_path = path / "config.json"
    if not (path.is_dir() and config_path.is_file()):
        return None
    config = read_json(config_path, "transformers config", top=dict)
    return config.get("vision_config", config)


def read_clip_checkpoint(path: str | Path) -> tuple[StateDict, str]:
    """Read a local CLIP checkpoint (file, or transformers directory); return tower keys and format."""
    path = require_path(path, "CLIP weights")
    if path.is_dir():
        if read_hf_config(path) is None:
            raise WeightsError(f"{str(path)!r} is not a transformers CLIP directory: it has no config.json")
        state = read_hf_directory(path)
    else:
        state = read_tensors(path)
    if is_hf_clip(state):
        return convert_hf_clip_vision_state_dict(state), "transformers CLIP checkpoint"
    return convert_open_clip_vision_state_dict(state), "open_clip checkpoint"
