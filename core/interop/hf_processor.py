"""The transformers processor an export ships, so `XProcessor.from_pretrained(out)` is the user's
next line and works: an image processor that prepares images as the encoder's Preprocess does,
the LLM's tokenizer, and the processor's own settings (BLIP-2's num_query_tokens, LLaVA's image
token count). `preprocessor_config.json` is written too, for AutoImageProcessor and for
transformers versions that keep the image processor there rather than in processor_config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.files.atomic import atomic_write_text, held_files, into_new_folder
from vlbridge.plugin.specs import Preprocess

RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL's codes, which transformers' image processors store


def blip_image_processor(preprocess: Preprocess) -> Any:
    """BLIP-2's image processor (resize straight to S x S, no crop) for `preprocess`."""
    from transformers import BlipImageProcessor

    if preprocess.pad_to_square is not None:
        raise VLBridgeError("BLIP-2's image processor cannot pad images to squares, and this encoder pads them first "
                            f"(with {preprocess.pad_to_square}); it has no exact BLIP-2 image processor")
    if preprocess.resize_mode != "squash" or preprocess.resize_size is not None:
        raise VLBridgeError(f"BLIP-2's image processor resizes straight to {preprocess.image_size} x {preprocess.image_size}; "
                            f"this encoder resizes ({preprocess.resize_mode}, to {preprocess.resize_size}) and centre-crops, "
                            "which it cannot express")
    return BlipImageProcessor(size={"height": preprocess.image_size, "width": preprocess.image_size},
                              resample=RESAMPLE[preprocess.interpolation], image_mean=list(preprocess.mean),
                              image_std=list(preprocess.std), do_convert_rgb=True)


def llava_image_processor(preprocess: Preprocess) -> Any:
    """LLaVA's image processor for `preprocess`: the shorter side or both sides resized, then a centre
    crop to S x S. CLIP's (as llava-hf ships), or LlavaImageProcessor with do_pad where the encoder
    pads to a square first; that one pads with its image_mean, so the two colours must agree."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    size, target = preprocess.image_size, preprocess.resize_size or preprocess.image_size
    if (preprocess.resize_mode == "shortest" or target != size) and preprocess.crop_offset != "floor":
        raise VLBridgeError("transformers' CLIPImageProcessor centre-crops at ((H - S) // 2, (W - S) // 2); this encoder's "
                            f"crop places an odd margin by {preprocess.crop_offset!r} (torchvision's), one pixel apart, "
                            "which the processor cannot express")
    resize = {"shortest_edge": target} if preprocess.resize_mode == "shortest" else {"height": target, "width": target}
    settings = dict(size=resize, crop_size={"height": size, "width": size}, do_center_crop=True,
                    resample=RESAMPLE[preprocess.interpolation], image_mean=list(preprocess.mean),
                    image_std=list(preprocess.std), do_convert_rgb=True)
    if preprocess.pad_to_square is None:
        return CLIPImageProcessor(**settings)
    mean_fill = tuple(int(m * 255) for m in preprocess.mean)  # LlavaImageProcessor's padding colour
    if mean_fill != preprocess.pad_to_square:
        raise VLBridgeError(f"transformers' LlavaImageProcessor pads to a square with its image_mean in 8-bit levels, {mean_fill} "
                            f"here; this encoder pads with {preprocess.pad_to_square}, which the processor cannot express")
    return LlavaImageProcessor(**settings, do_pad=True)


def save_processor(processor: Any, out: Path) -> None:
    """processor_config.json, the tokenizer(s) and preprocessor_config.json into `out`."""
    processor.save_pretrained(str(out))
    processor.image_processor.save_pretrained(str(out))


def write_export(out_dir: str | Path, model: Any, processor: Any, extra_files: dict[str, str] | None = None) -> Path:
    """A transformers model and its processor (and `extra_files`, name -> text: what the format has no
    place for), written into `out_dir` (new or empty) all at once: staged beside it and renamed, so an
    interrupted export leaves no folder that loads as a model without its processor."""
    out = Path(out_dir).expanduser()
    held = folder_contents(out, "export")

    def fill(folder: Path) -> None:
        model.save_pretrained(str(folder))
        save_processor(processor, folder)
        for name, text in (extra_files or {}).items():
            atomic_write_text(folder / name, text)

    if held:
        raise VLBridgeError(f"{out} already holds files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
                            "an export goes into a new or empty folder")
    return into_new_folder(out, fill)


def folder_contents(out: Path, what: str) -> list[str]:
    """The names in `out`; a VLBridgeError when a file or a link to nothing stands there."""
    try:
        return held_files(out)
    except NotADirectoryError as exc:
        raise VLBridgeError(f"{exc}; give a new or empty folder for the {what}") from None
