"""Any open_clip ViT tower, built from `OpenClipOptions` (factory of the `open-clip` encoder).

The tower is open_clip's own vision module, built by open_clip from the architecture's config
(its `VisionTransformer`, or its `TimmModel` around a timm ViT trunk), so open_clip checkpoints
load unchanged and strictly. The tokens are those of open_clip's `forward_intermediates` at block
`opts.layer`, before the final norm and the pooling head. Once the weights are in, the blocks after
`opts.layer`, the final norm and the head are removed with open_clip's / timm's own
`prune_intermediate_layers`: they are never run.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower, resize_pos_embed
from torch import nn

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.parts.freeze import FrozenPart, torch_dtype
from vlbridge.plugins.encoders import open_clip_tower
from vlbridge.plugins.encoders.clip_vit_l_convert import convert_open_clip_vision_state_dict
from vlbridge.plugins.encoders.open_clip_configs import is_config_file, vision_cfg_of
from vlbridge.plugins.encoders.open_clip_tower import OpenClipOptions
from vlbridge.plugin.specs import Preprocess, TokenShape
from vlbridge.files.weights import read_tensors, require_path, strict_load


def _vision_cfg(opts: OpenClipOptions, facts: Any) -> CLIPVisionCfg:
    """open_clip's vision config for the options; a native ViT is built at the requested resolution."""
    vision = dict(vision_cfg_of(opts.arch_config, opts.arch))
    if facts.trunk == "vit" and opts.image_size is not None:
        vision["image_size"] = opts.image_size  # open_clip's force_image_size
    try:
        return CLIPVisionCfg(**vision)
    except TypeError as exc:
        raise VLBridgeError(f"open-clip: open_clip {open_clip.__version__} cannot read the vision_cfg of {opts.arch} ({exc}); "
                            "a newer open_clip may know these keys") from exc


class OpenClipTower(FrozenPart):
    """open_clip's vision tower of `opts.arch`: pixels -> `(B, N, W)` tokens of block `opts.layer`."""

    def __init__(self, opts: OpenClipOptions, quick_gelu: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        facts = opts.tower
        self.opts = opts
        self.facts = facts
        self.quick_gelu = quick_gelu
        self.image_size = opts.resolved_image_size
        self.include_cls = opts.include_cls
        self.preprocess: Preprocess = open_clip_tower.preprocess(opts)
        with torch.device(device) if device is not None else nullcontext():  # built in fp32; `build` casts all of it
            self.visual = _build_vision_tower(opts.arch_config.get("embed_dim", facts.width), _vision_cfg(opts, facts),
                                              quick_gelu=quick_gelu)
        self.num_blocks = len(self._blocks())
        if not -self.num_blocks <= opts.layer < self.num_blocks:
            raise VLBridgeError(f"open-clip: layer {opts.layer} is out of range for the {self.num_blocks} blocks {opts.arch} was built with")
        self.index = opts.layer % self.num_blocks

    def _blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks if self.facts.trunk == "timm" else self.visual.transformer.resblocks

    @property
    def output_shape(self) -> TokenShape:
        """What `forward` really returns per image: tokens x width (checked against the spec)."""
        return open_clip_tower.output(self.opts)

    def finetune_blocks(self) -> list[nn.Module]:
        """The blocks that run (0..layer once `finish` pruned the rest), in forward order, for partial
        unfreezing, layer decay and gradient checkpointing (vlbridge.finetune.encoder_tuning)."""
        return list(self._blocks())[: self.index + 1]

    def load_pretrained(self, path: str | Path) -> None:
        """Strictly load an open_clip checkpoint (a full CLIP with `visual.*` keys, or the tower alone)."""
        source = require_path(path, "open_clip weights")
        state = convert_open_clip_vision_state_dict(read_tensors(source))
        if self.facts.trunk == "vit" and "positional_embedding" in state:  # another resolution: resample as open_clip does
            wrapped = {"visual.positional_embedding": state["positional_embedding"]}
            resize_pos_embed(wrapped, SimpleNamespace(visual=self.visual))
            state["positional_embedding"] = wrapped["visual.positional_embedding"]
        strict_load(self.visual, state, f"open_clip checkpoint {str(source)!r}")

    def finish(self) -> "OpenClipTower":
        """After loading: set a timm trunk's resolution, then drop what is never run (later blocks, norm, head)."""
        if self.facts.trunk == "timm":
            if self.opts.image_size is not None and self.opts.image_size != self.facts.image_size:
                if not hasattr(self.visual.trunk, "set_input_size"):
                    raise VLBridgeError(f"open-clip: timm trunk {self.facts.timm_model_name!r} cannot change its input size")
                self.visual.set_input_size(self.opts.image_size)
            self.visual.trunk.prune_intermediate_layers([self.index], prune_norm=True, prune_head=True)
            self.visual.head = nn.Identity()
        else:
            self.visual.prune_intermediate_layers([self.index], prune_norm=True, prune_head=True)
            self.visual.attn_pool = None
            self.visual.attn_pool_contrastive = None
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise VLBridgeError(f"open-clip expects pixels shaped (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}")
        weight = next(self.visual.parameters())
        out = self.visual.forward_intermediates(pixel_values.to(weight.dtype), indices=[self.index], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
        patches = out["image_intermediates"][0]
        prefix = out.get("image_intermediates_prefix")
        if self.include_cls and prefix is not None and prefix[0].shape[1] > 0:
            return torch.cat([prefix[0], patches], dim=1)
        return patches


def resolve_weights(opts: OpenClipOptions) -> tuple[Path | None, bool]:
    """(local weights file or None, QuickGELU?) for the options; an open_clip tag is downloaded."""
    config_quick = bool(opts.arch_config.get("quick_gelu", False))
    if not opts.pretrained:
        return None, opts.quick_gelu if opts.quick_gelu is not None else config_quick
    if opts.tag is None:
        return Path(opts.pretrained).expanduser(), opts.quick_gelu if opts.quick_gelu is not None else config_quick
    cfg = _tag_config(opts)
    _check_tag_preprocessing(opts, cfg)
    try:
        target = open_clip.download_pretrained(cfg)
    except Exception as exc:  # network errors come in many types (urllib, requests, huggingface_hub)
        raise WeightsError(f"cannot fetch open_clip weights {opts.arch}/{opts.tag} (offline?): {type(exc).__name__}: {exc}. "
                           "Download them where there is network and pass the local file as `pretrained`") from exc
    if not target:
        raise WeightsError(f"open_clip returned no file for {opts.arch}/{opts.tag}")
    quick = opts.quick_gelu if opts.quick_gelu is not None else config_quick or bool(cfg.get("quick_gelu", False))
    return Path(target), quick


def _tag_config(opts: OpenClipOptions) -> dict[str, Any]:
    if opts.arch == "tiny" or is_config_file(opts.arch):
        raise VLBridgeError(f"open-clip: {opts.tag!r} is not a local file, and arch {opts.arch!r} has no open_clip tags; "
                            "give the weights file's path")
    cfg = open_clip.get_pretrained_cfg(opts.arch, opts.tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(opts.arch)
        raise VLBridgeError(f"{opts.tag!r} is neither a local file nor an open_clip tag of {opts.arch}; "
                            f"tags: {', '.join(tags) or 'none'}")
    return cfg


def _check_tag_preprocessing(opts: OpenClipOptions, cfg: dict[str, Any]) -> None:
    """The declared preprocessing (a table, read without open_clip) must be open_clip's for this tag."""
    declared = open_clip_tower.preprocess(opts)
    theirs = {"mean": tuple(cfg.get("mean", declared.mean)), "std": tuple(cfg.get("std", declared.std)),
              "interpolation": cfg.get("interpolation", declared.interpolation), "resize_mode": cfg.get("resize_mode", declared.resize_mode)}
    ours = {"mean": declared.mean, "std": declared.std, "interpolation": declared.interpolation, "resize_mode": declared.resize_mode}
    if theirs != ours:
        raise VLBridgeError(f"open-clip: open_clip preprocesses {opts.arch}/{opts.tag} with {theirs}, but vlbridge declared {ours}; "
                            "update TAG_PREPROCESS in vlbridge/plugins/encoders/open_clip_configs.py")


def build(opts: OpenClipOptions) -> OpenClipTower:
    """The `open-clip` factory: random init, or `opts.pretrained` loaded strictly; pruned, frozen, in `opts.dtype`."""
    weights, quick_gelu = resolve_weights(opts)
    model = OpenClipTower(opts, quick_gelu=quick_gelu)
    if weights is not None:
        model.load_pretrained(weights)
    return model.finish().to(torch_dtype(opts.dtype)).freeze()
