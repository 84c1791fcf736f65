"""model.retrieve runs every Q-Former pass in batches of at most `batch_size`, with the same scores
whatever the batch size."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlbridge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 30), (200, 200, 200)]
IMAGES = [Image.new("RGB", (40, 40), colour) for colour in COLOURS]
TEXTS = ["a red square", "blue", "a green picture with nothing else in it", "yellow", "a grey block", "red and blue", "x"]


def test_query_and_text_passes_take_at_most_batch_size_rows_and_scores_do_not_change():
    """The query pass ran on all images and the text pass on all texts at once (COCO's 5k images
    and 25k captions: tens of GB of activations) whatever batch_size said."""
    model = vlbridge.build("tiny-qformer-opt", stage=1)
    qformer = model.connector
    seen: dict[str, list[int]] = {"query_outputs": [], "text_outputs": [], "multimodal_outputs": []}
    for name, rows in seen.items():
        original = getattr(qformer, name)

        def spy(*args, _original=original, _rows=rows, _name=name, **kwargs):
            _rows.append((args[2] if _name == "multimodal_outputs" else args[0]).shape[0])
            return _original(*args, **kwargs)

        setattr(qformer, name, spy)
    expected = model.retrieve(IMAGES, TEXTS, k=3, batch_size=64)
    for name in seen:
        seen[name].clear()
    got = model.retrieve(IMAGES, TEXTS, k=3, batch_size=2)
    assert seen["query_outputs"] and seen["text_outputs"] and seen["multimodal_outputs"]
    assert max(max(rows) for rows in seen.values()) <= 2, seen
    for name in ("itc", "i2t", "t2i"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-6)
