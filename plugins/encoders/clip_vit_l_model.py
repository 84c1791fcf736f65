"""CLIP ViT-L/14 through open_clip, built from `ClipVitLOptions` (factory of the `clip-vit-l` encoder).

The tower is open_clip's own `VisionTransformer` (ViT-L-14 or ViT-L-14-336 config, or a tiny one
with the spec's architecture), so open_clip checkpoints load unchanged. The output is the tokens of
block `opts.layer` (a Python index over the blocks' outputs: -2 is the penultimate block, LLaVA's
choice and transformers' `hidden_states[-2]`; a non-negative `i` is block `i`'s output, i.e.
transformers' `hidden_states[i + 1]`), with or without [CLS], before `ln_post` and `proj`.

To save compute and memory, the blocks after `opts.layer`, `ln_post` and `proj` are removed from
the tower after it is built: they are never run. Their weights in a checkpoint are skipped on
purpose; everything else loads strictly.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch import nn

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.parts.freeze import FrozenPart, torch_dtype
from vlbridge.plugins.encoders import clip_vit_l
from vlbridge.files.weights import StateDict, strict_load
from vlbridge.plugins.encoders.clip_vit_l import ClipVitLOptions, open_clip_name
from vlbridge.plugins.encoders.clip_vit_l_convert import read_clip_checkpoint, read_hf_config
from vlbridge.plugin.specs import Preprocess, TokenShape

_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_HEAD_KEYS = re.compile(r"^(ln_post\.(weight|bias)|proj)$")


def vision_cfg(opts: ClipVitLOptions) -> tuple[int, CLIPVisionCfg]:
    """(embed_dim, open_clip vision config) for the options: open_clip's own for 'l', the spec's for tiny."""
    name = open_clip_name(opts)
    if name is not None:
        config = open_clip.get_model_config(name)
        return config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"])
    a = opts.arch
    cfg = CLIPVisionCfg(layers=a["layers"], width=a["width"], head_width=a["width"] // a["heads"],
                        patch_size=a["patch"], image_size=opts.resolved_image_size)
    return a["embed_dim"], cfg


class ClipVisionEncoder(FrozenPart):
    """open_clip's CLIP vision tower, cut after block `opts.layer`: pixels -> `(B, N, W)` tokens."""

    def __init__(self, opts: ClipVitLOptions, quick_gelu: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.opts = opts
        self.quick_gelu = quick_gelu
        self.total_blocks = opts.arch["layers"]
        self.used_blocks = opts.layer % self.total_blocks + 1  # blocks 0..layer run; the rest never do
        self.include_cls = opts.include_cls
        self.image_size = opts.resolved_image_size
        self.preprocess: Preprocess = clip_vit_l.preprocess(opts)
        embed_dim, cfg = vision_cfg(opts)
        with torch.device(device) if device is not None else nullcontext():
            tower = _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu)
        tower.transformer.resblocks = tower.transformer.resblocks[: self.used_blocks]
        tower.ln_post = nn.Identity()
        tower.proj = None  # the pooled-embedding head: unused for token features
        self.tower = tower
        grid = self.image_size // opts.arch["patch"]
        self.width = opts.arch["width"]
        self.num_tokens = grid * grid + int(self.include_cls)

    @property
    def output_shape(self) -> TokenShape:
        """What `forward` really returns per image: tokens x width (checked against the spec)."""
        return TokenShape(self.num_tokens, self.width)

    def finetune_blocks(self) -> list[nn.Module]:
        """The blocks that run (0..layer), in forward order, for partial unfreezing, layer decay and
        gradient checkpointing (vlbridge.finetune.encoder_tuning)."""
        return list(self.tower.transformer.resblocks)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise VLBridgeError(f"clip-vit-l expects pixels shaped (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}")
        tower = self.tower
        x = tower.conv1(pixel_values.to(tower.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = tower.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (W,) -> (B, 1, W)
        x = torch.cat([cls, x], dim=1) + tower.positional_embedding.to(x.dtype)  # (B, T, W)
        x = tower.ln_pre(x)
        batch_first = getattr(tower.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)  # (T, B, W) for old open_clip
        for block in tower.transformer.resblocks:
            x = block(x)
        x = x if batch_first else x.transpose(0, 1)
        return x if self.include_cls else x[:, 1:]

    def load_pretrained(self, path: str | Path) -> str:
        """Strictly load a local open_clip or transformers CLIP checkpoint; return the format found."""
        state, fmt = read_clip_checkpoint(path)
        strict_load(self.tower, self._skip_unused(state), f"{fmt} {str(path)!r}")
        return fmt

    def _skip_unused(self, state: StateDict) -> StateDict:
        """Drop the weights of the removed head and of blocks `used..total-1`: they are never run."""

        def used(key: str) -> bool:
            block = _BLOCK_KEY.match(key)
            if block is not None:
                return not self.used_blocks <= int(block[1]) < self.total_blocks
            return _HEAD_KEYS.match(key) is None

        return {key: value for key, value in state.items() if used(key)}


def resolve_weights(opts: ClipVitLOptions) -> tuple[Path | None, bool]:
    """(local weights file or None, QuickGELU?) for the options; an open_clip tag is downloaded."""
    if not opts.pretrained:
        return None, bool(opts.quick_gelu)
    path = Path(opts.pretrained).expanduser()
    if path.exists() or path.suffix in (".safetensors", ".pt", ".pth", ".bin") or "/" in opts.pretrained:
        config = read_hf_config(path)
        hf_quick = config is not None and config.get("hidden_act") == "quick_gelu"
        return path, opts.quick_gelu if opts.quick_gelu is not None else hf_quick
    return _download_tag(opts)


def _download_tag(opts: ClipVitLOptions) -> tuple[Path, bool]:
    """Fetch open_clip's weights for a tag such as 'openai' (needs the network or a warm cache)."""
    name, tag = open_clip_name(opts), opts.pretrained
    if name is None:
        raise VLBridgeError(f"clip-vit-l variant 'tiny' has no open_clip weights; {tag!r} must be a local file")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise VLBridgeError(f"{tag!r} is neither a local file nor an open_clip tag of {name}; tags: {', '.join(tags)}")
    try:
        target = open_clip.download_pretrained(cfg)
    except Exception as exc:  # network errors come in many types (urllib, requests, huggingface_hub)
        raise WeightsError(
            f"cannot fetch open_clip weights {name}/{tag} (offline?): {type(exc).__name__}: {exc}. "
            "Download them where there is network and pass the local file as `pretrained`"
        ) from exc
    if not target:
        raise WeightsError(f"open_clip returned no file for {name}/{tag}")
    quick = opts.quick_gelu if opts.quick_gelu is not None else bool(cfg.get("quick_gelu", False))
    return Path(target), quick


def build(opts: ClipVitLOptions) -> ClipVisionEncoder:
    """The `clip-vit-l` factory: random init, or `opts.pretrained` loaded strictly; frozen, in `opts.dtype`."""
    weights, quick_gelu = resolve_weights(opts)
    model = ClipVisionEncoder(opts, quick_gelu=quick_gelu, device="meta" if weights else None)
    if weights is not None:
        model.load_pretrained(weights)
    return model.to(torch_dtype(opts.dtype)).freeze()
