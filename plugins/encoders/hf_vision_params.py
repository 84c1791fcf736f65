"""Parameter counts of `hf-vision` towers from their config.json, without torch, so that `vlbridge
validate` can say how big the frozen encoder is before anything is loaded.

One formula per family transformers builds (`CLIPVisionModel`, `SiglipVisionModel`, `Dinov2Model`,
`Dinov2WithRegistersModel`, `ViTModel`, `DeiTModel`, `ViTMAEModel`), counting what vlbridge keeps: `blocks` of the
blocks, and the pooling head only where it stays (`head`). Other model types get a plain ViT's count as
a SizeEstimate (printed with '~'); a DeiT config that leaves a counted key to its class defaults,
which vlbridge does not table, gets None. Tests compare every formula with the built module.
"""

from __future__ import annotations

from typing import Any, Callable

from vlbridge.plugin.specs import SizeEstimate

Counter = Callable[[dict[str, Any], int, bool], int]


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _patches(c: dict[str, Any]) -> int:
    return (c["image_size"] // c["patch_size"]) ** 2


def _conv(c: dict[str, Any], bias: bool) -> int:
    """The patch embedding: a patch_size x patch_size convolution from num_channels to hidden_size."""
    w = c["hidden_size"]
    return c["num_channels"] * c["patch_size"] ** 2 * w + (w if bias else 0)


def vit_block(w: int, mlp: int, qkv_bias: bool = True) -> int:
    """A pre-norm ViT block of width `w`: two LayerNorms, q/k/v (bias optional) and an output projection,
    then the MLP's `mlp` parameters (open_clip_params counts its blocks with it too)."""
    return 4 * w + 3 * _linear(w, w, qkv_bias) + _linear(w, w) + mlp


def two_layer_mlp(w: int, inner: int) -> int:
    return _linear(w, inner) + _linear(inner, w)


def _clip(c: dict[str, Any], blocks: int, head: bool) -> int:
    w = c["hidden_size"]
    stem = w + _conv(c, bias=False) + (_patches(c) + 1) * w + 2 * w  # class embedding, patches, positions, pre_layrnorm
    return stem + blocks * vit_block(w, two_layer_mlp(w, c["intermediate_size"])) + 2 * w  # post_layernorm stays


def _siglip(c: dict[str, Any], blocks: int, head: bool) -> int:
    w, inner = c["hidden_size"], c["intermediate_size"]
    body = _conv(c, bias=True) + _patches(c) * w + blocks * vit_block(w, two_layer_mlp(w, inner)) + 2 * w
    pooling = w + 3 * w * w + 3 * w + _linear(w, w) + 2 * w + two_layer_mlp(w, inner)  # probe, attention, norm, MLP
    return body + (pooling if head and c["vision_use_head"] else 0)


def _dinov2_mlp(c: dict[str, Any]) -> int:
    w = c["hidden_size"]
    hidden = int(w * c["mlp_ratio"])
    if not c["use_swiglu_ffn"]:
        return two_layer_mlp(w, hidden)
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # transformers' Dinov2SwiGLUFFN rounding
    return 2 * _linear(w, hidden) + _linear(hidden, w)


def _dinov2(c: dict[str, Any], blocks: int, head: bool) -> int:
    w = c["hidden_size"]
    with_registers = c["model_type"] == "dinov2_with_registers"
    registers = c["num_register_tokens"] if with_registers else 0
    mask = 1 if with_registers or c["use_mask_token"] else 0  # the registers model always has a mask token
    stem = (1 + mask + registers) * w + _conv(c, bias=True) + (_patches(c) + 1) * w  # [CLS], mask, registers, positions
    block = vit_block(w, _dinov2_mlp(c), c["qkv_bias"]) + 2 * w  # + two layer scales
    return stem + blocks * block + 2 * w


def _vit_like(prefix: int, pooler_always: bool) -> Counter:
    """ViTModel ([CLS]) and DeiTModel ([CLS] + distillation): AutoModel builds both with their pooler,
    which vlbridge drops from a ViT with the later blocks but keeps on a DeiT."""
    def count(c: dict[str, Any], blocks: int, head: bool) -> int:
        w = c["hidden_size"]
        stem = prefix * w + _conv(c, bias=True) + (_patches(c) + prefix) * w
        body = stem + blocks * vit_block(w, two_layer_mlp(w, c["intermediate_size"]), c["qkv_bias"]) + 2 * w
        return body + (_linear(w, c.get("pooler_output_size") or w) if head or pooler_always else 0)
    return count


COUNTS: dict[str, Counter] = {
    "clip_vision_model": _clip, "siglip_vision_model": _siglip, "dinov2": _dinov2, "dinov2_with_registers": _dinov2,
    "vit": _vit_like(1, pooler_always=False), "deit": _vit_like(2, pooler_always=True),
    "vit_mae": lambda c, blocks, head: _vit_like(1, pooler_always=False)(c, blocks, False),  # ViTMAEModel has no pooler
}


def _generic_vit(c: dict[str, Any], blocks: int) -> int:
    """Any plain ViT: a patch convolution, [CLS] and learned positions, pre-norm blocks, a final norm.
    A family's extras (layer scales, registers, relative position tables, a pooler) are left out."""
    w = c["hidden_size"]
    inner = c["intermediate_size"] if "intermediate_size" in c else int(w * c["mlp_ratio"])
    stem = w + _conv(c, bias=True) + (_patches(c) + 1) * w
    return stem + blocks * vit_block(w, two_layer_mlp(w, inner)) + 2 * w


def count_params(model_type: str, values: dict[str, Any], blocks: int, head: bool) -> int | SizeEstimate | None:
    """Parameters of the tower with `blocks` blocks (and its pooling head if `head`): exact for the
    families above, else a plain-ViT estimate; None for a config lacking a key the formula reads."""
    count = COUNTS.get(model_type)
    try:
        if count is not None:
            return count({**values, "model_type": model_type}, blocks, head)
    except (KeyError, TypeError):  # a key left to a class default vlbridge does not table (DeiT)
        return None
    try:
        if "depths" in values:  # stages of changing width (Swin, ConvNeXt): hidden_size is only the last one's
            raise KeyError("depths")
        return SizeEstimate(_generic_vit(values, blocks), f"a plain ViT's formula ({model_type} has no exact one)")
    except (KeyError, TypeError):  # not a plain ViT, or a size left to a class default not tabled here
        return SizeEstimate(None, f"{model_type}: not estimated (not a plain ViT, or config.json leaves a size to its class default)")
