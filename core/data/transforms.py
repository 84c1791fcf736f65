"""Image transforms from an encoder's declared `Preprocess`, and decoding an `ImageRef` to pixels.

Eval is `vlbridge.parts.images.eval_transform` itself (resize to (S, S) or centre-crop, normalise), so training-time
evaluation and `vlbridge.parts.images` can never disagree. Train is BLIP-2's `blip2_image_train`:
RandomResizedCrop(S, scale=(0.5, 1.0)) with the encoder's interpolation, a random horizontal flip,
then the same scaling and normalisation; an encoder that pads to a square pads first, as its eval does.
Randomness comes from torch's generator (seed it).
"""

from __future__ import annotations

import io
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vlbridge.data.records import DataError, ImageRef
from vlbridge.errors import VLBridgeError
from vlbridge.parts.images import decode_image, eval_transform, interpolation_mode, load_image, square_padding
from vlbridge.plugin.specs import Preprocess

__all__ = ["TRAIN_CROP_SCALE", "eval_transform", "open_image", "train_transform"]

TRAIN_CROP_SCALE = (0.5, 1.0)  # BLIP-2's pretraining crop: at least half the image area


def train_transform(preprocess: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> randomly cropped, maybe flipped, normalised float `(3, S, S)`."""
    size = preprocess.image_size
    return T.Compose([
        *square_padding(preprocess),  # an encoder that pads for eval (LLaVA-1.5's 'pad') trains on padded images too
        T.RandomResizedCrop(size, scale=TRAIN_CROP_SCALE, interpolation=interpolation_mode(preprocess), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
    ])


def open_image(ref: ImageRef) -> Image.Image:
    """Decode a file or in-memory image (a tar sample's) to upright RGB; failures are errors naming the image."""
    if ref.path is not None:
        return load_image(ref.path)  # its errors already name the file
    data = ref.data or b""
    try:
        return decode_image(io.BytesIO(data), f"image {ref.name!r}", len(data))
    except VLBridgeError as exc:
        raise DataError(str(exc)) from exc
