"""model.retrieve keeps what it holds for every image (encoder outputs, score matrices) in host memory
and moves one re-rank chunk at a time to the device: it kept all of them on the model's device
(COCO's 5k images at BLIP-2's 364 px: 19 GB of encoder outputs, plus a (5k, Q, 25k) ITC product).

No GPU is needed to see where tensors are made: the model runs on a fake CUDA device (torch's
FakeTensorMode: shapes and devices without data) and a dispatch mode records every op's outputs."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vlbridge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES, TEXTS, BATCH = 11, 13, 4  # counts no tiny-model dimension shares; more images than one batch
TEXT_LIST = [f"{colour} shape" for colour in ("red", "blue", "green", "yellow", "grey", "white", "black")] + ["x"] * 6


class Placements(TorchDispatchMode):
    """(device type, shape) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [(t.device.type, tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_encoder_outputs_and_scores_stay_on_the_host_and_the_device_sees_one_chunk():
    model = vlbridge.build("tiny-qformer-opt", stage=1)
    size = model.plan.preprocess.image_size
    images = [torch.zeros(3, size, size) for _ in range(IMAGES)]
    tokens = tuple(model.encode_images(torch.zeros(1, 3, size, size)).shape[1:])  # (N, W)
    placements = Placements()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        # the input checks read pixel values, which fake tensors lack; where tensors live does not depend on them
        model.pixel_values = lambda items: torch.zeros(len(items), 3, size, size, device=model.device)
        with placements:
            result = model.retrieve(images, TEXT_LIST, k=3, batch_size=BATCH)
    on_device = [shape for where, shape in placements.seen if where == "cuda"]
    encoder_rows = {shape[0] for shape in on_device if shape[1:] == tokens}
    assert encoder_rows and max(encoder_rows) <= BATCH, f"encoder outputs of {max(encoder_rows)} images at once on the device"
    assert ("cpu", (IMAGES, *tokens)) in placements.seen  # the store of all of them, in host memory
    every_image = [shape for shape in on_device if IMAGES in shape]
    assert not every_image, f"tensors with a row for every image on the device: {sorted(set(every_image))}"
    assert {t.device.type for t in (result.itc, result.i2t, result.t2i)} == {"cpu"}
    assert result.itc.shape == result.i2t.shape == result.t2i.T.shape == (IMAGES, len(TEXT_LIST))
