"""A BLIP-2 / InstructBLIP directory's image processor, checked against eva-vit-g's eval transform.

The imported encoder prepares images as BLIP-2 does (CLIP's mean and std, bicubic, squashed to the
tower's size); it has no option for another normalisation. A directory whose processor prepares
pixels otherwise (a fine-tune with its own mean and std, a bilinear resize) would caption other
pixels than transformers does from the same image, so it is refused by name rather than imported.
"""

from __future__ import annotations

import math
from pathlib import Path

from vlbridge.errors import VLBridgeError
from vlbridge.files.hf_config import read_local_json
from vlbridge.plugin.specs import Preprocess


def check_image_processor(src: Path, ours: Preprocess, family: str) -> None:
    """Refuse `src` when its saved image processor (if any) prepares images otherwise than `ours`."""
    from vlbridge.plugins.encoders.hf_vision_configs import image_processor_config, processor_preprocess

    processor = image_processor_config(lambda name: read_local_json(str(src), name))
    if processor is None:
        return  # nothing saved: transformers' Blip2Processor defaults are BLIP-2's, which ours are
    try:
        theirs = processor_preprocess(processor, f"{src}")
    except ValueError as exc:
        raise VLBridgeError(f"cannot import this {family} checkpoint exactly: {exc}") from None
    problems = _differences(theirs, ours)
    if problems:
        raise VLBridgeError(f"cannot import this {family} checkpoint exactly: its image processor prepares images otherwise than "
                            f"the imported eva-vit-g encoder would ({'; '.join(problems)}), so vlbridge would read other pixels "
                            "from the same image")


def _differences(theirs: Preprocess, ours: Preprocess) -> list[str]:
    found = []
    for name in ("mean", "std"):
        a, b = getattr(theirs, name), getattr(ours, name)
        if not all(math.isclose(x, y, rel_tol=0, abs_tol=1e-6) for x, y in zip(a, b)):
            found.append(f"image_{name} {list(a)} where eva-vit-g uses {list(b)}")
    if theirs.interpolation != ours.interpolation:
        found.append(f"a {theirs.interpolation} resize where eva-vit-g's is {ours.interpolation}")
    resize = _resize(theirs)
    if resize != _resize(ours):
        found.append(f"resize {resize} where eva-vit-g's is {_resize(ours)}")
    return found


def _resize(pre: Preprocess) -> str:
    """The geometry of a preprocessing, in words: the padding, what is resized to what, and the crop."""
    target = pre.resize_size or pre.image_size
    pad = "" if pre.pad_to_square is None else f"padded to a square with {pre.pad_to_square}, then "
    if pre.resize_mode == "squash" and target == pre.image_size:
        return f"{pad}to {pre.image_size} x {pre.image_size}"
    side = f"both sides to {target}" if pre.resize_mode == "squash" else f"the shorter side to {target}"
    return f"{pad}{side}, then a centre crop of {pre.image_size}"

