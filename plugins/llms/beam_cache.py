"""A key/value cache for beams that share a prompt: preallocated, written in place, reordered in part.

transformers' DynamicCache grows every layer's keys and values with `torch.cat` at each new token
and follows the surviving beams with an `index_select` of the whole cache, prompt included: two
copies of every layer's cache per step. Captioning profiles (BENCHMARKS.md, issue 21) put those
copies at 10-20% of a beam search's CPU time. Here each layer holds one buffer sized for the prompt
and the new tokens; a new token is written into it, and a reorder copies only the positions after
the prompt, because every beam of an image holds the same prompt keys (beam search only ever moves a
beam within its image). The tensors attention reads hold the same numbers either way.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class BeamGroups:
    """What a cache's layers share: rows in groups of `size` (an image's beams), whether a reorder
    keeps every row within its group (checked once per reorder for all layers), and one scratch
    buffer for reorders, so following the beams allocates nothing per step."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._checked: tuple[torch.Tensor, bool] | None = None
        self._scratch: torch.Tensor | None = None

    def keeps(self, beam_idx: torch.Tensor) -> bool:
        if self._checked is None or self._checked[0] is not beam_idx:
            rows = torch.arange(beam_idx.numel(), device=beam_idx.device)
            self._checked = (beam_idx, bool(torch.equal(beam_idx // self.size, rows // self.size)))
        return self._checked[1]

    def scratch(self, like: torch.Tensor, room: int) -> torch.Tensor:
        """A contiguous tensor shaped like `like`, in memory reused from one reorder to the next
        (allocated with `room` elements, so a growing `like` fits without a new allocation)."""
        if self._scratch is None or self._scratch.numel() < like.numel() or self._scratch.dtype != like.dtype \
                or self._scratch.device != like.device:
            self._scratch = like.new_empty(max(room, like.numel()))
        return self._scratch[:like.numel()].view(like.shape)


class SharedPromptLayer(DynamicLayer):
    """One layer's cache: (rows, heads, capacity, head_dim) buffers; `keys`/`values` are views of
    the filled positions. Rows come in `groups` (an image's beams) sharing the first `shared` positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, groups: BeamGroups, capacity: int) -> None:
        super().__init__()
        shared = keys.shape[-2]
        self._buffers = []
        for prompt in (keys, values):  # each its own shape: MLA (DeepSeek-V2/V3) keys are wider than its values
            images, heads, _, width = prompt.shape
            buffer = prompt.new_empty(images * groups.size, heads, shared + capacity, width)
            buffer.view(images, groups.size, heads, shared + capacity, width)[:, :, :, :shared] = prompt[:, None]
            self._buffers.append(buffer)
        self.groups, self.shared, self.length = groups, shared, shared
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = (buffer[:, :, :self.length] for buffer in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled ones (growing the buffers if they are full)."""
        end = self.length + key_states.shape[-2]
        if end > self._buffers[0].shape[-2]:
            self._buffers = [torch.cat([buffer[:, :, :self.length], buffer.new_empty(*buffer.shape[:2], 2 * end, buffer.shape[-1])], dim=2)
                             for buffer in self._buffers]
        self._buffers[0][:, :, self.length:end] = key_states
        self._buffers[1][:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the beams: only the positions after the shared prompt move, when every row stays
        within its image's group (always, in beam search); any other order moves everything, and
        from then on the groups no longer share their prompt."""
        if not self.groups.keeps(beam_idx):
            self.shared = 0
        beam_idx = beam_idx.to(self.device)
        for buffer in self._buffers:
            moving = buffer[:, :, self.shared:self.length]
            moving.copy_(torch.index_select(moving, 0, beam_idx, out=self.groups.scratch(moving, buffer.numel())))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the number of positions to remove as a negative number")
        self.length = max(self.length + tokens_to_remove, 0)
        self.shared = min(self.shared, self.length)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Hand over to plain tensors: the rows no longer come in this cache's groups."""
        self._plain([self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._plain([self.keys[indices, ...], self.values[indices, ...]])

    def _plain(self, tensors: list[torch.Tensor]) -> None:
        self._buffers = tensors
        self.shared, self.length = 0, tensors[0].shape[-2]
        self._views()


def share_prompt(cache: Any, group: int, capacity: int) -> bool:
    """Give every row of a prompt's DynamicCache `group` beams in SharedPromptLayers with room for
    `capacity` new positions, in place; False (cache untouched) where a layer is anything but a
    plain DynamicLayer (sliding windows, quantized or linear-attention states keep their own class)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    if any(not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4 for layer in layers):
        return False
    groups = BeamGroups(group)
    cache.layers = [SharedPromptLayer(layer.keys, layer.values, groups, capacity) for layer in layers]
    return True
