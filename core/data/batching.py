"""Batching, and the training loop's view of the data: how far it got and what was skipped.

`collate` stacks the usable items and passes the skipped ones along, because it runs in the
DataLoader workers: a counter there would never reach the main process. `DataProgress.observe`
folds every batch into one place the trainer can read, report and checkpoint.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import torch

from vlbridge.data.records import DataError, Skipped

TENSOR_KEYS = ("image_index", "index")  # ints stacked into int64 tensors


def collate(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Items -> one batch dict: `pixel_values` (B, 3, S, S) (or `image_embeds` (B, N, W) from the
    frozen-feature cache), `image_index` and `index` (B,) int64,
    every other field as a list (`text`, `image_id`, `captions`, ...), plus `skipped` (the Skipped
    items), `consumed` (items including skipped) and `streams` (tar-stream positions).

    A batch whose items were all skipped has B = 0: check `len(batch["index"])`.
    """
    valid = [item for item in items if not isinstance(item, Skipped)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    image = "image_embeds" if valid and "image_embeds" in valid[0] else "pixel_values"  # cached encoder outputs replace pixels
    batch: dict[str, Any] = {
        image: torch.stack([item[image] for item in valid]) if valid else torch.empty(0, 3, 0, 0),
        **{key: torch.tensor([item[key] for item in valid], dtype=torch.long) for key in TENSOR_KEYS},
    }
    fields = [key for key in (valid[0] if valid else {}) if key not in (image, "stream", *TENSOR_KEYS)]
    for item in valid:
        if set(item) != set(valid[0]):
            raise DataError(f"cannot batch items with different fields: {sorted(valid[0])} and {sorted(item)}")
    batch.update({key: [item[key] for item in valid] for key in fields})
    batch.update(skipped=skipped, consumed=len(items), streams=_stream_positions(items))
    return batch


BATCH_KEYS = ("skipped", "consumed", "streams")  # what collate adds about the whole batch, not per item


def select_items(batch: Mapping[str, Any], keep: Sequence[bool]) -> dict[str, Any]:
    """The collated batch with only the items where `keep` is true; the batch-wide fields (skips,
    consumed count, stream positions) stay as they were, since they describe what was read."""
    size = len(batch["index"])
    if len(keep) != size:
        raise DataError(f"select_items: {len(keep)} flags for a batch of {size} items")
    rows = torch.tensor([i for i, flag in enumerate(keep) if flag], dtype=torch.long)
    picked: dict[str, Any] = {}
    for key, value in batch.items():
        if key in BATCH_KEYS:
            picked[key] = value
        elif isinstance(value, torch.Tensor):
            picked[key] = value[rows]
        else:
            picked[key] = [value[i] for i in rows.tolist()]
    return picked


def _stream_positions(items: Sequence[dict[str, Any] | Skipped]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for item in items:
        stream = item.stream if isinstance(item, Skipped) else item.get("stream")
        if stream is not None:
            positions[stream[0]] = max(positions.get(stream[0], 0), stream[1])
    return positions


class DataProgress:
    """Where the trainer is in an epoch (to resume there) and every sample skipped so far.

    `samples` counts consumed items on this rank (what `ResumableSampler.set_epoch(start=...)`
    takes); `streams` holds each tar-stream worker's position (what `ShardDataset` resumes from).
    Skips are counted over the whole run; the first `keep` of them are kept with their names.
    """

    def __init__(self, epoch: int = 0, keep: int = 1000):
        self.epoch, self.keep = epoch, keep
        self.samples = 0
        self.streams: dict[str, int] = {}
        self.last_stream: str | None = None  # the stream of the latest batch: its successor comes next
        self.skipped: list[Skipped] = []
        self.skip_counts: Counter[str] = Counter()

    def observe(self, batch: Mapping[str, Any]) -> None:
        """Fold one collated batch in."""
        self.samples += int(batch["consumed"])
        for key, position in batch["streams"].items():
            self.streams[key] = max(self.streams.get(key, 0), position)
            self.last_stream = key  # a batch of an iterable dataset comes from one worker
        for skip in batch["skipped"]:
            self.skip_counts[skip.kind] += 1
            if len(self.skipped) < self.keep:
                self.skipped.append(skip)

    def new_epoch(self, epoch: int) -> None:
        """Start counting positions for another epoch (skip counts carry on)."""
        self.epoch, self.samples, self.streams, self.last_stream = epoch, 0, {}, None

    @property
    def skipped_count(self) -> int:
        return sum(self.skip_counts.values())

    def summary(self, show: int = 5) -> str:
        """One line for the log: how many were skipped, why, and which."""
        if not self.skip_counts:
            return "no samples skipped"
        kinds = ", ".join(f"{kind}: {n}" for kind, n in self.skip_counts.most_common())
        names = ", ".join(skip.name for skip in self.skipped[:show])
        more = ", ..." if self.skipped_count > show else ""
        return f"{self.skipped_count} samples skipped ({kinds}): {names}{more}"

    def state_dict(self) -> dict[str, Any]:
        """The resume position, for a checkpoint (plain ints and strings)."""
        return {"epoch": self.epoch, "samples": self.samples, "streams": dict(self.streams), "last_stream": self.last_stream}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "DataProgress":
        """Rebuild from `state_dict()` to resume at that position."""
        missing = [key for key in ("epoch", "samples", "streams") if key not in state]
        if missing:
            raise DataError(f"data position in the checkpoint lacks {missing}; expected keys epoch, samples and streams")
        progress = cls(int(state["epoch"]))
        progress.samples, progress.streams = int(state["samples"]), {str(k): int(v) for k, v in state["streams"].items()}
        progress.last_stream = state.get("last_stream")
        return progress
