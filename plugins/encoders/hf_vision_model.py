"""A transformers vision tower, built from `HFVisionOptions` (factory of the `hf-vision` encoder).

The tower is loaded by transformers itself (`CLIPVisionModel` / `SiglipVisionModel` for CLIP and
SigLIP directories, full dual-tower ones included; `AutoModel` otherwise), and the tokens are
taken from its own forward: `hidden_states[layer]`, then the optional final norm and the token
selection. Loading is strict: a missing weight, a weight of the wrong shape, or a weight that is
neither the tower's nor one it is known to skip (the other tower of a dual model, a classifier
head) is a WeightsError naming them. Once loaded, the blocks after `layer` are removed (they are
never run), and so are SigLIP's pooling head and ViT's pooler, unless `keep_all_layers` asks for
the whole tower (to export it, e.g. back to LLaVA).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.utils import logging as hf_logging

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.parts.freeze import FrozenPart, torch_dtype
from vlbridge.files.hf_config import load_failure, looks_local
from vlbridge.plugins.encoders import hf_vision
from vlbridge.plugins.encoders.hf_vision import HFVisionOptions
from vlbridge.plugins.encoders.hf_vision_configs import FAMILIES, TINY_CONFIG, TowerFacts
from vlbridge.plugin.specs import Preprocess, TokenShape

_FIX = ("give options.model a local directory written by save_pretrained (config.json and the weights), or run where the "
        "Hugging Face hub is reachable; variant: tiny needs neither")
_LAYER_LISTS = ("vision_model.encoder.layers", "encoder.layers", "encoder.layer", "layers", "vision_model.encoder.layer", "model.layer")
_NORMS = ("layernorm", "post_layernorm", "norm", "final_layernorm")  # where other towers keep their final norm
_OTHER_TOWER = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")  # of a dual model
# Heads on top of the tower that hidden_states never pass through: an image-classification checkpoint's
# classifier, a CLIPVisionModelWithProjection's projection (Stable Diffusion's and IP-Adapter's image_encoder).
_SKIPPED = ("classifier.", "visual_projection.")
_REMOVED = {"vit": ("pooler.",), "siglip_vision_model": ("head.", "vision_model.head.")}  # removed after loading: may be absent


def _attr(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


class HFVisionEncoder(FrozenPart):
    """A transformers vision tower: pixels -> `(B, N, W)` tokens of `hidden_states[opts.layer]`."""

    def __init__(self, tower: nn.Module, opts: HFVisionOptions) -> None:
        super().__init__()
        facts = opts.tower
        self.tower = tower  # the transformers model itself (hf_llava exports it)
        self.opts = opts
        self.facts = facts
        self.family = FAMILIES.get(facts.model_type)  # None: a tower known only by its prefix_tokens
        self.image_size = opts.resolved_image_size
        self.preprocess: Preprocess = hf_vision.preprocess(opts)
        self.keep_cls, self.keep_registers = (n > 0 for n in hf_vision.kept_prefix(opts))
        self.norm_path = self._find_norm() if opts.final_norm else None
        self.call_kwargs = self._resolution_kwargs()
        self.in_order = self._unmask()
        index = opts.layer % (facts.layers + 1)
        self.layers_path = self._find_layers()  # where the blocks are (None: an unfamiliar layout)
        self.index = index if opts.keep_all_layers else self._cut(index)

    @property
    def vision(self) -> nn.Module:
        """The module holding the embeddings, blocks and final norm (a CLIP / SigLIP model's vision_model)."""
        return getattr(self.tower, "vision_model", self.tower)

    @property
    def output_shape(self) -> TokenShape:
        """What `forward` really returns per image: tokens x width (checked against the spec)."""
        return hf_vision.output(self.opts)

    def _find_norm(self) -> str:
        names = (self.family.final_norm,) if self.family is not None else _NORMS
        found = next((name for name in names if isinstance(getattr(self.vision, name, None), nn.Module)), None)
        if found is None:
            raise VLBridgeError(f"hf-vision: final_norm is set but {type(self.tower).__name__} has none of {list(names)}")
        return found

    def _resolution_kwargs(self) -> dict[str, Any]:
        """DINOv2 always interpolates its position embeddings (DINOv3's rotary ones fit any grid); CLIP,
        SigLIP and ViT must be asked to."""
        if self.image_size == self.facts.image_size or (self.family is not None and self.family.any_resolution):
            return {}
        if "interpolate_pos_encoding" not in inspect.signature(self.tower.forward).parameters:
            raise VLBridgeError(f"hf-vision: {type(self.tower).__name__} cannot take {self.image_size} px images (its position "
                                f"embeddings are for {self.facts.image_size} px and it cannot interpolate them); leave image_size unset")
        return {"interpolate_pos_encoding": True}

    def _unmask(self) -> bool:
        """ViT-MAE's forward keeps a random (1 - mask_ratio) of the patches, shuffled: a quarter of them,
        different at every call. As a feature extractor it must see every patch in order, so mask_ratio
        is set to 0 and `forward` passes noise that sorts to the identity order. True for such a tower."""
        if self.family is None or not self.family.masks_patches:
            return False
        self.tower.config.mask_ratio = 0.0  # the embeddings read it at every call
        return True

    def _cut(self, index: int) -> int:
        """Drop the blocks after hidden_states[index] and the pooling heads; the index into the cut model's hidden_states."""
        vision = self.vision
        if getattr(vision, "use_head", False) and hasattr(vision, "head"):  # SigLIP's attention-pooling head
            vision.use_head = False
            del vision.head
        if getattr(self.tower, "pooler", None) is not None and self.facts.model_type == "vit":
            self.tower.pooler = None
        if self.layers_path is None:
            return index  # an unfamiliar layout: every block runs
        layers = _attr(self.tower, self.layers_path)
        del layers[max(index, 1):]  # one block stays: transformers collects hidden_states while blocks run
        return -1 if index > 0 else 0

    def _find_layers(self) -> str | None:
        """The attribute path of the tower's ModuleList of blocks (all `facts.layers` of them)."""
        return next((path for path in _LAYER_LISTS if isinstance(found := _attr(self.tower, path), nn.ModuleList)
                     and len(found) == self.facts.layers), None)

    def finetune_blocks(self) -> list[nn.Module] | None:
        """The blocks whose output reaches `hidden_states[layer]`, in forward order, for partial
        unfreezing, layer decay and gradient checkpointing (vlbridge.finetune.encoder_tuning); None for an
        unfamiliar layout."""
        if self.layers_path is None:
            return None
        layers = list(_attr(self.tower, self.layers_path))
        return layers if self.index < 0 else layers[: self.index]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise VLBridgeError(f"hf-vision expects pixels shaped (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}")
        dtype = next(self.tower.parameters()).dtype
        kwargs = dict(self.call_kwargs)
        if self.in_order:
            patches = (self.image_size // self.facts.patch) ** 2
            kwargs["noise"] = torch.arange(patches, device=pixel_values.device, dtype=torch.float32).expand(len(pixel_values), -1)
        out = self.tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[self.index]
        if self.norm_path is not None:
            hidden = getattr(self.vision, self.norm_path)(hidden)
        return self._select(hidden)

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        """[CLS] (if kept), registers (if kept), then the patch tokens."""
        cls, registers = self.facts.cls_tokens, self.facts.registers
        parts = [hidden[:, :cls]] if self.keep_cls else []
        if self.keep_registers:
            parts.append(hidden[:, cls:cls + registers])
        parts.append(hidden[:, cls + registers:])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints its own load report; vlbridge raises a clearer error from the same facts."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _model_class(facts: TowerFacts) -> Any:
    if facts.model_type == "clip_vision_model":
        return transformers.CLIPVisionModel
    if facts.model_type == "siglip_vision_model":
        return transformers.SiglipVisionModel
    return transformers.AutoModel


def tiny_tower() -> nn.Module:
    """The random-weight `tiny` variant (vlbridge's frozen-part builder fixes the seed)."""
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{k: v for k, v in TINY_CONFIG.items() if k != "model_type"}))


def load_tower(opts: HFVisionOptions) -> nn.Module:
    """The tower from `opts.source`, loaded strictly in `opts.dtype`."""
    source = opts.source
    assert source is not None
    facts = opts.tower
    model_class = _model_class(facts)
    local = looks_local(source)
    if local and not Path(source).expanduser().is_dir():
        raise VLBridgeError(f"hf-vision: model directory not found: {source}; {_FIX}")
    where = str(Path(source).expanduser()) if local else source
    try:
        with _quiet_transformers():
            model, info = model_class.from_pretrained(where, output_loading_info=True, dtype=torch_dtype(opts.dtype),
                                                      trust_remote_code=False, **({"local_files_only": True} if local else {}))
    except Exception as exc:  # transformers raises many types for a broken or unreachable source
        raise load_failure(f"the {model_class.__name__} tower", source, exc, _FIX) from exc
    _check_loading(info, facts, f"{model_class.__name__} weights {source!r}", removed=not opts.keep_all_layers)
    return model


def _check_loading(info: dict[str, Any], facts: TowerFacts, source: str, removed: bool) -> None:
    """Strictness on top of transformers' lenient loading; `removed`: the pooling heads will be dropped."""
    skipped = _SKIPPED + (_OTHER_TOWER if facts.dual else ())
    absent_ok = _REMOVED.get(facts.model_type, ()) if removed else ()
    unexpected = sorted(key for key in info.get("unexpected_keys", ()) if not key.startswith(skipped))
    missing = sorted(key for key in info.get("missing_keys", ()) if not key.startswith(absent_ok))
    mismatched = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get("mismatched_keys", ()))
    problems = [f"{len(missing)} missing: {', '.join(missing[:8])}" if missing else "",
                f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}" if unexpected else "",
                f"{len(mismatched)} of another shape: {', '.join(mismatched[:8])}" if mismatched else ""]
    if any(problems):
        raise WeightsError(f"{source} do not match the model: " + "; ".join(p for p in problems if p))


def build(opts: HFVisionOptions) -> HFVisionEncoder:
    """The `hf-vision` factory: the tower loaded (or the tiny one drawn), cut after `layer`, frozen, in `opts.dtype`."""
    model = tiny_tower() if opts.source is None else load_tower(opts)
    return HFVisionEncoder(model, opts).to(torch_dtype(opts.dtype)).freeze()
