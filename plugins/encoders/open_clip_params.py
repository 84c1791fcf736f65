"""Parameter counts of `open-clip` towers from open_clip's model config, without torch or open_clip,
so that `vlbridge validate` can say how big the frozen encoder is before anything is built.

What is counted is what `OpenClipTower.finish` leaves: the patch embedding, class token, position
embeddings, `ln_pre` and the blocks up to `layer`. `ln_post`, `proj` and the attentional poolers
(CoCa's) are pruned, so `embed_dim`, `output_dim` and `attentional_pool` do not count.

- open_clip's own VisionTransformer: exact from `vision_cfg` (width, layers, head_width, mlp_ratio,
  patch_size, no_ln_pre, ls_init_value and the custom-block options); None for a vision_cfg key this
  module does not know or `norm_kwargs` beyond `eps` (they may change what a block holds).
- timm trunks: exact for the SigLIP ViTs (`vit_<size>_patch<P>_siglip_<px>`: no class token, patch
  bias, q/k/v bias, no layer scale; timm's default MLP ratio 4 except so400m's 3.7362). None for
  the others (EVA / EVA02's SwiGLU and rope variants, CLIP-style `pre_norm` ViTs, `gap` and register
  ViTs): their layout is in timm's Python model definitions, which vlbridge does not read.
"""

from __future__ import annotations

from typing import Any

from vlbridge.plugins.encoders.hf_vision_params import two_layer_mlp, vit_block
from vlbridge.plugins.encoders.open_clip_configs import TowerFacts

# CLIPVisionCfg's defaults for the keys counted here (tests compare them with open_clip's dataclass).
NATIVE_DEFAULTS: dict[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "ls_init_value": None, "no_ln_pre": False,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "norm_kwargs": None,
}
# Keys that only shape what finish() prunes, or that hold no parameters.
_NOT_COUNTED = frozenset({
    "image_size", "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "pos_embed_type",
    "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs",
})
_CUSTOM_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
SIGLIP_MLP_RATIO: dict[str, float] = {"so400m": 3.7362}  # timm's vit_*_siglip definitions; the rest use timm's default
TIMM_MLP_RATIO = 4.0


def _block(width: int, mlp: int, layer_scale: bool) -> int:
    """A pre-norm ViT block (q/k/v with bias, a 2-layer MLP of `mlp` hidden units) and its layer scales."""
    return vit_block(width, two_layer_mlp(width, mlp)) + (2 * width if layer_scale else 0)


def _custom_extras(c: dict[str, Any], width: int, mlp: int) -> int:
    """What open_clip's CustomResidualAttentionBlock adds to a default block, per enabled option."""
    heads = width // c["head_width"]
    head_dim = width // heads
    return ((4 * head_dim if c["qk_norm"] else 0) + (heads if c["scaled_cosine_attn"] else 0) + (heads if c["scale_heads"] else 0)
            + (2 * width if c["scale_attn_inner"] else 0) + (2 * width if c["scale_attn"] else 0) + (2 * mlp if c["scale_fc"] else 0))


def native_params(vision: dict[str, Any], image_size: int, blocks: int) -> int | None:
    """open_clip's VisionTransformer at `image_size` with its first `blocks` blocks, nothing after them."""
    if set(vision) - set(NATIVE_DEFAULTS) - _NOT_COUNTED or set(vision.get("norm_kwargs") or {}) - {"eps"}:
        return None
    c = {**NATIVE_DEFAULTS, **vision}
    width, patch = c["width"], c["patch_size"]
    mlp = int(width * c["mlp_ratio"])
    grid = image_size // patch
    stem = 3 * patch * patch * width + width + (grid * grid + 1) * width + (0 if c["no_ln_pre"] else 2 * width)
    block = _block(width, mlp, c["ls_init_value"] is not None)
    if c["block_type"] == "custom" or any(c[flag] for flag in _CUSTOM_FLAGS):
        block += _custom_extras(c, width, mlp)
    return stem + blocks * block


def timm_params(facts: TowerFacts, image_size: int, blocks: int) -> int | None:
    """A timm SigLIP ViT trunk (position embeddings resampled to `image_size`) with its first `blocks`
    blocks, its final norm and head pruned; None for other timm trunks."""
    name = facts.timm_model_name or ""
    parts = name.split("_")
    if len(parts) != 5 or parts[0] != "vit" or parts[3] != "siglip":  # vit_<size>_patch<P>_siglip_<px> only
        return None
    width, patch = facts.width, facts.patch
    mlp = int(width * SIGLIP_MLP_RATIO.get(parts[1], TIMM_MLP_RATIO))
    grid = image_size // patch
    stem = 3 * patch * patch * width + width + grid * grid * width  # patch conv with bias, positions (no class token)
    return stem + blocks * _block(width, mlp, layer_scale=False)
