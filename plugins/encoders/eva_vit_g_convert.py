"""EVA ViT-g checkpoints: key conversion (pure functions) and format detection.

Our parameter names follow EVA / LAVIS (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.{i}.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}`), so
LAVIS, EVA-CLIP and timm checkpoints need little more than a prefix removed. Each converter keeps only
the encoder's own namespace (a full BLIP-2 or CLIP checkpoint also holds other parts) and passes any
key it does not know through unchanged, so the strict load lists it as unexpected.

Formats: (a) a transformers BLIP-2 directory (`config.json` + safetensors or `pytorch_model.bin`,
sharded or not), `vision_model.*` keys or, for a saved `Blip2VisionModel`, bare ones;
(b) a LAVIS / EVA-CLIP `.pth` (`visual_encoder.*` or bare keys); (c) an OpenCLIP / timm EVA
checkpoint (timm `Eva` keys, possibly under `visual.trunk.`); (d) our own `.safetensors`, alone or in
a vlbridge encoder directory (`config.json` with model_type "eva-vit" beside `model.safetensors`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from vlbridge.errors import WeightsError
from vlbridge.files.userfiles import read_json
from vlbridge.plugins.encoders.eva_vit_g import BLIP2_MODEL_TYPES, directory_arch
from vlbridge.files.weights import StateDict, read_hf_directory, read_tensors, require_path, tensor_keys

HF_MODEL_TYPES = BLIP2_MODEL_TYPES
VLBRIDGE_WEIGHTS = "model.safetensors"  # beside config.json (model_type "eva-vit") in a vlbridge encoder directory
# The EVA-CLIP / timm image head after the blocks (final norm, pooling norm, projection): BLIP-2
# takes the blocks' tokens without it, so these keys are skipped on purpose.
EVA_HEAD_PREFIXES = ("norm.", "fc_norm.", "head.")

# transformers name (after the `vision_model.` prefix) -> ours; the qkv bias is handled apart.
_HF_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
]]
_TO_HF_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
    (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"encoder.layers.\1.mlp.\2.\3"),
]]
_HF_QKV_BIAS = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")
_OUR_QV_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.(q|v)_bias$")


def _strip_prefix(state: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Keep the keys under the first prefix that any key has, without it ('' keeps all keys)."""
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return dict(state)


def convert_hf_blip2_vision_state_dict(state: StateDict) -> StateDict:
    """transformers `Blip2VisionModel` keys (with or without `vision_model.`) -> ours.

    `post_layernorm` is BLIP-2's `ln_vision`, which belongs to the connector: skipped here.
    transformers stores one `qkv.bias`; we keep its q and v slices. Its k slice is dropped: a key
    bias adds `q . b_k` to every score of a query, the same constant across keys, which softmax
    removes, so it has no effect on the output (LAVIS fixes it at zero).
    """
    out: StateDict = {}
    for key, value in _strip_prefix(state, ("vision_model.",)).items():
        if key.startswith("post_layernorm."):
            continue
        bias = _HF_QKV_BIAS.match(key)
        if bias:
            q, _k, v = value.chunk(3)  # (3W,) -> three (W,)
            out[f"blocks.{bias[1]}.attn.q_bias"], out[f"blocks.{bias[1]}.attn.v_bias"] = q.clone(), v.clone()
            continue
        for pattern, replacement in _HF_RULES:
            if pattern.match(key):
                key = pattern.sub(replacement, key)
                break
        out[key] = value
    return out


def to_hf_blip2_vision_state_dict(state: StateDict, prefix: str = "vision_model.") -> StateDict:
    """Our keys -> transformers BLIP-2 vision keys (for export); the k bias is written as zeros.

    The result has no `post_layernorm`: that is the connector's `ln_vision`, exported with it.
    """
    out: StateDict = {}
    for key, value in state.items():
        qv = _OUR_QV_BIAS.match(key)
        if qv:
            if qv[2] == "q":  # (W,) q, zeros, v -> (3W,)
                v_bias = state.get(f"blocks.{qv[1]}.attn.v_bias")
                if v_bias is None:
                    raise WeightsError(f"cannot export block {qv[1]}: it has a q_bias but no v_bias")
                out[f"{prefix}encoder.layers.{qv[1]}.self_attn.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        for pattern, replacement in _TO_HF_RULES:
            if pattern.match(key):
                key = pattern.sub(replacement, key)
                break
        out[prefix + key] = value
    return out


def convert_lavis_vision_state_dict(state: StateDict) -> StateDict:
    """LAVIS BLIP-2 (`visual_encoder.*`) or EVA-CLIP `eva_vit_g.pth` (bare) keys -> ours.

    LAVIS's `ln_vision` lies outside `visual_encoder.` and belongs to the connector.
    """
    return _drop_head(_strip_prefix(state, ("visual_encoder.",)))


def convert_timm_eva_state_dict(state: StateDict) -> StateDict:
    """timm `Eva` keys (bare, or under OpenCLIP's `visual.trunk.`, `trunk.`, EVA-CLIP's `visual.`) -> ours."""
    return _drop_head(_strip_prefix(state, ("visual.trunk.", "trunk.", "visual.")))


def _drop_head(state: StateDict) -> StateDict:
    return {key: value for key, value in state.items() if not key.startswith(EVA_HEAD_PREFIXES)}


def read_eva_checkpoint(path: str | Path) -> tuple[StateDict, str]:
    """Read any supported EVA ViT-g checkpoint; return its state dict in our names and its format."""
    path = require_path(path, "EVA ViT-g weights")
    if path.is_dir() and directory_arch(str(path)) is not None:
        return convert_timm_eva_state_dict(read_tensors(require_path(path / VLBRIDGE_WEIGHTS, "EVA ViT-g weights"))), "vlbridge encoder directory"
    if path.is_dir():
        state = convert_hf_blip2_vision_state_dict(read_hf_blip2_vision(path))
        return (state if hf_vision_config(path).get("qkv_bias", True) else with_zero_qv_biases(state)), "transformers BLIP-2 directory"
    keys = tensor_keys(path)
    if keys is None:
        state = read_tensors(path)
        fmt, convert, prefix = detect_eva_format(list(state))
    else:  # safetensors: read only the encoder's tensors (a single-file BLIP-2 also holds the LLM)
        fmt, convert, prefix = detect_eva_format(keys)
        state = read_tensors(path, lambda key: key.startswith(prefix))
    return convert(state), fmt


def detect_eva_format(keys: list[str]) -> tuple[str, Callable[[StateDict], StateDict], str]:
    """(format name, converter, prefix of the encoder's keys) from a checkpoint's tensor names."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("vision_model."):
        return "transformers BLIP-2 state dict", convert_hf_blip2_vision_state_dict, "vision_model."
    if "embeddings.patch_embedding.weight" in keys:
        return "transformers BLIP-2 vision state dict", convert_hf_blip2_vision_state_dict, ""
    if has("visual_encoder."):
        return "LAVIS BLIP-2 checkpoint", convert_lavis_vision_state_dict, "visual_encoder."
    for prefix in ("visual.trunk.", "trunk.", "visual."):
        if has(prefix):
            return "OpenCLIP / timm EVA checkpoint", convert_timm_eva_state_dict, prefix
    return "EVA state dict (vlbridge, EVA-CLIP or timm names)", convert_timm_eva_state_dict, ""


_QKV_WEIGHT = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")


def with_zero_qv_biases(state: StateDict) -> StateDict:
    """A vision tower saved with qkv_bias=False has no q/v biases; eva-vit-g always has them, and zeros
    compute the same attention exactly. Each block with a qkv weight gets them (a missing block stays
    missing, for the strict load to name)."""
    zeros: StateDict = {}
    for key, weight in state.items():
        block = _QKV_WEIGHT.match(key)
        if block:
            zeros.update({f"blocks.{block[1]}.attn.{name}": weight.new_zeros(weight.shape[1]) for name in ("q_bias", "v_bias")})
    return {**zeros, **state}


def hf_vision_config(directory: Path) -> dict:
    """The vision config of a transformers BLIP-2 / InstructBLIP directory (or of a saved vision model)."""
    config = read_json(directory / "config.json", "transformers config", top=dict)
    return (config.get("vision_config") or {}) if config.get("model_type") != "blip_2_vision_model" else config


def read_hf_blip2_vision(directory: Path) -> StateDict:
    """The vision tensors of a transformers BLIP-2 directory, reading only the shards that hold them."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{str(directory)!r} is not a transformers BLIP-2 directory: it has no config.json")
    model_type = read_json(config_path, "transformers config", top=dict).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise WeightsError(f"{config_path} has model_type {model_type!r}; expected one of {list(HF_MODEL_TYPES)}")
    keep = (lambda k: k.startswith("vision_model.")) if model_type == "blip-2" else (lambda k: True)
    state = read_hf_directory(directory, keep)
    if not state:
        raise WeightsError(f"{directory} holds no vision tensors (keys starting with 'vision_model.')")
    return state
