"""Frozen parts: the image encoder and the LLM stay fixed while the connector trains.

BLIP-2 freezes its ViT and LLM by turning off gradients, switching to eval mode and replacing
`train` with a no-op. Here the same guarantee comes from a base class: while a `FrozenPart` is
frozen, `train(True)` (also when a parent module calls it) keeps it in eval mode, so dropout and
similar layers never switch on behind the user's back. `unfreeze()` lifts the guarantee for
fine-tuning runs that do want to train the part; `train_along(modules)` keeps a frozen part in eval
mode except for the listed submodules (the unfrozen last blocks of an encoder, LoRA's dropout on an
LLM), which follow the model's train/eval mode.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from vlbridge.errors import VLBridgeError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_Part = TypeVar("_Part", bound="FrozenPart")


def torch_dtype(name: str) -> torch.dtype:
    """Map an options' precision name (`fp32|fp16|bf16`) to the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise VLBridgeError(f"unknown precision {name!r}; use one of {sorted(DTYPES)}") from None


class FrozenPart(nn.Module):
    """Base class of parts that are not trained: frozen parameters, always in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False
        self._train_along: list[nn.Module] = []

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self: _Part) -> _Part:
        """Turn off every parameter's gradient and switch to eval mode, until `unfreeze()`."""
        for param in self.parameters():
            param.requires_grad_(False)
        self._frozen = True
        super().train(False)
        return self

    def unfreeze(self: _Part) -> _Part:
        """Make the part trainable again (for fine-tuning); the mode is left as it is."""
        self._frozen = False
        for param in self.parameters():
            param.requires_grad_(True)
        return self

    def train(self: _Part, mode: bool = True) -> _Part:
        """Like `nn.Module.train`, except that a frozen part stays in eval mode (but for the
        submodules given to `train_along`, which follow `mode`)."""
        super().train(mode and not self._frozen)
        for module in getattr(self, "_train_along", ()):
            module.train(mode)
        return self

    def train_along(self, modules: "list[nn.Module]") -> None:
        """Submodules that follow train/eval mode although the part is frozen: the parts of it that
        train (fine-tuning), whose dropout should act as in training. Replaces the previous list."""
        self._train_along = list(modules)
        for module in self._train_along:
            module.train(self.training)

    def requires_grad_(self: _Part, requires_grad: bool = True) -> _Part:
        """Refuse to turn gradients on while frozen: that is what `unfreeze()` is for."""
        if requires_grad and self._frozen:
            raise VLBridgeError(
                f"{type(self).__name__} is frozen; call unfreeze() before turning its gradients on"
            )
        return super().requires_grad_(requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the part's floating-point parameters (its compute dtype)."""
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.get_default_dtype()


def train_what_trains(module: nn.Module, mode: bool) -> None:
    """Set a plain (non-FrozenPart) part's mode as FrozenPart keeps its own: a submodule all of whose
    parameters train follows `mode` whole (its dropout included), one with none that train stays in
    eval mode, and a mixed one is in eval mode itself while its children are decided alike. So a
    plugin encoder with its last blocks unfrozen no longer ran its frozen blocks' dropout in training."""
    trains = [p.requires_grad for p in module.parameters()]
    if trains and all(trains):
        module.train(mode)
    elif not any(trains):
        module.train(False)
    else:
        module.training = False  # this module's own flag; its children are decided one by one
        for child in module.children():
            train_what_trains(child, mode)
