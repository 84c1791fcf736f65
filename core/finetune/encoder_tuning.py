"""Unfreezing an image encoder for fine-tuning (BLIP-2 trains its ViT with the Q-Former for captioning,
VQA and retrieval): all of it or its last N blocks, layer-wise lr decay, gradient checkpointing.

The optional encoder protocol. Partial unfreezing, layer decay and gradient checkpointing need the
encoder's transformer blocks; an encoder module says which they are with a method

    def finetune_blocks(self) -> Sequence[nn.Module] | None:
        "The blocks that run, in forward order (block 0 first); None when it cannot tell."

(the built-in eva-vit-g, clip-vit-l, open-clip and hf-vision encoders define it). A module without
it that holds a `blocks` ModuleList (timm's layout) is read from that. An encoder with neither can
still be unfrozen whole (`unfreeze: all`) without layer decay and gradient checkpointing.

Layers are numbered as BEiT / EVA fine-tuning numbers them: 0 for every encoder parameter that
comes before the first block (patch and position embeddings, a pre-norm), i + 1 for block i, and
D + 1 for what comes after the last of the D blocks (a final norm), in `named_parameters()` order.
Layer decay gives layer l the learning rate `lr * decay ** (D + 1 - l)`; the connector plays the
head's part at the full rate.

Gradient checkpointing wraps each trainable block's `forward` (an instance attribute, as
accelerate's hooks do), so the encoder's own forward and its state-dict names are unchanged: the
block's activations are recomputed in the backward pass instead of stored. Frozen blocks before the
trainable ones build no autograd graph at all (no parameter or input of theirs needs a gradient).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import FrozenPart

PROTOCOL_HINT = ("define finetune_blocks() on the encoder module, returning its blocks in forward order "
                 "(docs/fine-tuning.md, 'For encoder plugins')")


def encoder_blocks(encoder: nn.Module) -> list[nn.Module] | None:
    """The encoder's blocks in forward order, from `finetune_blocks()` or a `blocks` ModuleList; None when it lists none."""
    listed = getattr(encoder, "finetune_blocks", None)
    if callable(listed):
        found = listed()
        if found is None:
            return None
        blocks = list(found)
        if not all(isinstance(block, nn.Module) for block in blocks):
            raise VLBridgeError(f"{type(encoder).__name__}.finetune_blocks() must return nn.Modules, got "
                                f"{sorted({type(b).__name__ for b in blocks})}")
        return blocks
    blocks = getattr(encoder, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else None


def layer_ids(encoder: nn.Module, blocks: Sequence[nn.Module]) -> dict[str, int]:
    """Parameter name -> layer: 0 before the blocks, i + 1 in block i, len(blocks) + 1 after them."""
    owner = {id(param): index + 1 for index, block in enumerate(blocks) for param in block.parameters()}
    ids, seen_block = {}, False
    for name, param in encoder.named_parameters():
        layer = owner.get(id(param))
        if layer is not None:
            seen_block = True
            ids[name] = layer
        else:
            ids[name] = len(blocks) + 1 if seen_block else 0
    return ids


@dataclass(frozen=True)
class UnfrozenEncoder:
    """What `unfreeze_encoder` turned on: the trainable names, each one's layer, and the block count."""

    names: tuple[str, ...]
    layers: dict[str, int]
    depth: int | None  # None: the encoder lists no blocks
    blocks: tuple[nn.Module, ...]  # the trainable blocks (for gradient checkpointing)

    def lr_scale(self, name: str, layer_decay: float) -> float:
        """The multiplier of the encoder's lr for one parameter: layer_decay^(D + 1 - layer)."""
        if layer_decay == 1 or self.depth is None:
            return 1.0
        return layer_decay ** (self.depth + 1 - self.layers[name])


def unfreeze_encoder(encoder: nn.Module, unfreeze: str | int, *, who: str, need_blocks: bool = False) -> UnfrozenEncoder:
    """Turn gradients on for all of the encoder (`"all"`) or its last `unfreeze` blocks and whatever
    follows them; everything else stays frozen. The trained part follows the model's train/eval mode,
    the frozen rest stays in eval mode. `need_blocks`: fail when the encoder lists no blocks (layer
    decay, gradient checkpointing)."""
    blocks = encoder_blocks(encoder)
    if blocks is None and (unfreeze != "all" or need_blocks):
        asked = f"unfreeze: {unfreeze}" if unfreeze != "all" else "layer_decay / grad_checkpointing"
        raise VLBridgeError(f"finetune.encoder: {who} ({type(encoder).__name__}) does not list its blocks, so {asked} cannot "
                            f"be applied; use unfreeze: all without layer_decay and grad_checkpointing, or {PROTOCOL_HINT}")
    if blocks is not None and not blocks:
        raise VLBridgeError(f"finetune.encoder: {who} runs no blocks (its output is taken before the first one), so there is "
                            "nothing to fine-tune but its embeddings; use unfreeze: all, or set unfreeze: none")
    depth = len(blocks) if blocks is not None else None
    if isinstance(unfreeze, int) and depth is not None and unfreeze > depth:
        raise VLBridgeError(f"finetune.encoder.unfreeze: {unfreeze} blocks asked for, but {who} runs {depth}; "
                            f"give 1 to {depth}, or all")
    layers = layer_ids(encoder, blocks) if blocks is not None else {name: 0 for name, _ in encoder.named_parameters()}
    first = 0 if unfreeze == "all" else (depth or 0) - int(unfreeze) + 1  # the lowest trained layer
    names = tuple(name for name, _ in encoder.named_parameters() if layers[name] >= first)
    if not names:
        raise VLBridgeError(f"finetune.encoder: {who} has no parameters to train")
    trained_blocks = tuple(blocks[first - 1:] if blocks is not None and first >= 1 else blocks or ())
    _turn_on(encoder, set(names), unfreeze == "all", trained_blocks)
    return UnfrozenEncoder(names, layers, depth, trained_blocks)


def _turn_on(encoder: nn.Module, names: set[str], whole: bool, blocks: Sequence[nn.Module]) -> None:
    """requires_grad on exactly `names`; the mode follows the model for the trained part only."""
    if isinstance(encoder, FrozenPart) and whole:
        encoder.unfreeze()  # all of it trains: all of it follows train/eval mode
    elif isinstance(encoder, FrozenPart):
        encoder.train_along(list(blocks))
    for name, param in encoder.named_parameters():
        param.requires_grad_(name in names)


def enable_grad_checkpointing(blocks: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant torch.utils.checkpoint)."""
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block)


def disable_grad_checkpointing(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, under checkpoint when a backward pass will need its activations."""
    forward = type(block).forward
    if not torch.is_grad_enabled() or not block.training:
        return forward(block, *args, **kwargs)
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
