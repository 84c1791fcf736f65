"""DataLoader worker processes stop when the trainer is done with them, not at a later garbage collection.

A loader iterator left to the cyclic garbage collector is finalised after its queues were closed, so
its workers never hear the stop signal: torch then waits 5 s per worker before killing them, and a
`vlbridge compare` or `demo` stalled that long for every training run.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import torch
from torch.utils.data import Dataset

import vlbridge.train
from tests.test_trainer_samples import config, mse_objective, write_caption_data
from vlbridge.data import DataProgress, build_dataset, make_loader
from vlbridge.errors import VLBridgeError
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess
from vlbridge.train.inputs import BatchStream

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = 5.0  # seconds: a stop takes milliseconds; a missed stop signal costs 5 s per worker


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"))


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Whatever stops the workers must happen at a known point, not whenever the collector runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def new_children(before: set[Any]) -> list[Any]:
    return [child for child in multiprocessing.active_children() if child not in before]


def collect_seconds() -> float:
    """Time one full garbage collection: it would stop any loader the trainer left behind."""
    start = time.monotonic()
    gc.collect()
    return time.monotonic() - start


def two_worker_config(data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    values = config(data, out, assembly="tiny-linear-opt", stage=2, steps=3, log_every=3, **overrides)
    values["data"]["train"]["num_workers"] = 2
    return values


def test_fit_stops_its_loader_workers_before_it_returns(tmp_path, data):
    before = set(multiprocessing.active_children())
    with no_garbage_collection():
        result = vlbridge.train.run(two_worker_config(data, tmp_path / "out"), objective=mse_objective)
        assert result.step == 3
        assert new_children(before) == []
    assert collect_seconds() < PROMPT


def test_a_failing_fit_stops_its_loader_workers_too(tmp_path, data):
    calls = []

    def failing(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("objective failed on purpose")
        return mse_objective(model, batch)

    before = set(multiprocessing.active_children())
    with no_garbage_collection():
        with pytest.raises(RuntimeError, match="on purpose"):
            vlbridge.train.run(two_worker_config(data, tmp_path / "out"), objective=failing)
        assert new_children(before) == []
    assert collect_seconds() < PROMPT


def _indices(stream: BatchStream, count: int) -> list[list[int]]:
    return [next(stream)["index"].tolist() for _ in range(count)]


def test_a_closed_stream_stops_its_workers_and_a_new_one_resumes_exactly(data):
    dataset = build_dataset({"format": "jsonl", "paths": [str(data / "train.jsonl")]}, Preprocess(16, CLIP_MEAN, CLIP_STD, "bicubic"), train=True)
    options = dict(seed=3, rank=0, world_size=1, num_workers=2, drop_last=False)  # 16 samples: 4 batches of 4 an epoch
    whole = BatchStream(dataset, 4, **options)
    expected = _indices(whole, 10)
    whole.close()
    before = set(multiprocessing.active_children())
    with no_garbage_collection():
        first = BatchStream(dataset, 4, **options)
        head = _indices(first, 6)  # into the second epoch
        start = time.monotonic()
        first.close()
        assert time.monotonic() - start < PROMPT and new_children(before) == []
        with pytest.raises(VLBridgeError, match="closed"):
            next(first)
        second = BatchStream(dataset, 4, **options, progress=DataProgress.from_state(first.progress.state_dict()))
        tail = _indices(second, 4)
        second.close()
        assert new_children(before) == []
    assert head + tail == expected


PARENT: dict[str, int] = {}  # set at run time: a forked worker inherits it, a spawned one re-imports this module empty


class WhoAmI(Dataset):
    """Items that say whether the worker reading them was forked from this test process."""

    shuffle = False

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": torch.zeros(3, 2, 2), "image_index": index, "index": index, "forked": PARENT.get("pid") == os.getppid()}


@pytest.fixture
def spawn_by_default() -> Iterator[None]:
    """This process as `vlbridge compare` starts its workers: spawned, so spawning is their default too."""
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(before, force=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_loader_workers_are_forked_even_where_spawning_is_the_default(spawn_by_default):
    """A spawned loader worker imports torch and vlbridge, and exits a whole interpreter: seconds for
    every epoch's loader (a compare run's stop took 2 to 5 s per loader that way)."""
    PARENT["pid"] = os.getpid()
    try:
        batches = list(make_loader(WhoAmI(), 2, num_workers=2))
    finally:
        PARENT.clear()
    assert [flag for batch in batches for flag in batch["forked"]] == [True] * 4
