"""What inference and retrieval need of a built model, as a structural type.

`VLBridgeModel` calls `vlbridge.modeling.inference` and `vlbridge.modeling.retrieval` for its
`generate`/`caption`/`answer`/`features`/`retrieve`; those functions read the model through this
protocol instead of importing the model's module, so the imports run one way (model -> inference,
retrieval -> running) even for type checkers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from vlbridge.errors import VLBridgeError


class RunningModel(Protocol):
    """The members of `VLBridgeModel` that generation, features and retrieval use."""

    connector: nn.Module
    llm: Any  # the LLM part (None in a stage-1 model)
    training: bool

    @property
    def plan(self) -> Any: ...

    @property
    def device(self) -> torch.device: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def pixel_values(self, images: Any) -> torch.Tensor: ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def visual_tokens(self, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                      instructions: Sequence[str] | None = None) -> torch.Tensor: ...


def checked_batch_size(value: Any) -> int:
    """A batch size the caller passed: a whole number of at least 1 (range() ran zero times on -1,
    returning no captions, and failed on 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VLBridgeError(f"batch_size must be a whole number of at least 1, got {value!r}")
    return value


@contextmanager
def evaluating(model: RunningModel) -> Iterator[None]:
    """Eval mode for the duration, then the caller's mode back: inference run on a model left in
    train mode would otherwise apply the connector's dropout (different outputs on every call)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
