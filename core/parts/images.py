"""Images in, an encoder's normalised `(B, 3, S, S)` pixel batch out.

The eval transform is BLIP-2's by default: resize to `(S, S)` with the encoder's interpolation,
scale to [0, 1], normalise with its mean and std. An encoder whose `Preprocess` asks for it gets
CLIP's (and DINOv2's) instead: resize the shorter side, keeping the aspect ratio, then centre-crop
`(S, S)`. Inputs may be PIL images, file paths, uint8 tensors (raw pixels, `(3, H, W)`) or float
tensors. A float tensor is taken as **already normalised** for this encoder, so it must already be
`(3, S, S)` or `(B, 3, S, S)`: raw floats cannot be told apart from normalised ones, and guessing
would silently normalise twice.

Colours come out as transformers' image processors make them: transparency (an alpha channel, a
palette's or PNG's transparent colour) is laid on white, so a transparent pixel does not show the
colour hidden under it. A file (or a tar sample's bytes) is read upright by its EXIF orientation, as
transformers' `load_image` and photo viewers show it; a PIL image you pass is used as its pixels lie,
as an image processor uses it (apply `PIL.ImageOps.exif_transpose` first to have it upright).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.functional import InterpolationMode

from vlbridge.errors import VLBridgeError
from vlbridge.files.image_urls import url_problem
from vlbridge.files.userfiles import not_a_file
from vlbridge.plugin.specs import Preprocess

ImageInput = Union[Image.Image, str, os.PathLike, torch.Tensor]

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def interpolation_mode(preprocess: Preprocess) -> InterpolationMode:
    """torchvision's mode for the encoder's declared interpolation (Preprocess admits only these two)."""
    return _INTERPOLATION[preprocess.interpolation]


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes for 16-bit greyscale (a 16-bit PNG opens so)


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """An 8-bit RGB copy of `image`, transparency laid on white as transformers' `convert_to_rgb` lays it
    (Pillow's convert("RGB") drops the alpha and shows what the transparent pixels hide). Pillow also
    clips 16-bit pixels at 255 (a dark 16-bit scan becomes white), so 16-bit greyscale is scaled to 8
    bits first (v / 257, 65535 -> 255); signed or 32-bit integer and float pixels have no fixed range,
    so they are refused rather than guessed."""
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        grey = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")
        clear = image.info.get("transparency")  # a 16-bit PNG's one transparent grey value
        if isinstance(clear, int):
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(values == clear, 0, 255).astype(np.uint8), mode="L")))
        image = grey
    if image.mode in ("I", "F"):
        kind = "signed or 32-bit integer" if image.mode == "I" else "floating-point"
        raise VLBridgeError(f"{name} has {kind} pixels (Pillow mode {image.mode!r}), which have no fixed range to read as "
                            "colours; save it as an 8- or 16-bit image (PNG, JPEG, ...)")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


_PILLOW_FLAG = threading.Lock()  # one reader at a time flips Pillow's process-wide flag


@contextmanager
def truncated_files_refused() -> Iterator[None]:
    """Pillow's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` (lmms-eval sets it when imported) fills a
    cut-short file's missing rows with grey and reads it as whole; vlbridge's readers refuse such a
    file, whoever set the flag, and leave the flag as they found it. Nothing is touched where the flag
    is off (the default); where it is on, the readers that clear it take turns, and another thread of
    the process sees it off while one of them decodes."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _PILLOW_FLAG:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as upright RGB; a missing or unreadable file is a VLBridgeError naming it. A URL
    is refused as one (vlbridge reads local files only), not reported as a path with its '//' collapsed."""
    problem = url_problem(path)
    if problem:
        raise VLBridgeError(problem)
    path = Path(path).expanduser()
    problem = not_a_file(path)
    if problem:
        raise VLBridgeError(f"image file {str(path)!r} {problem}")
    return decode_image(path, f"image file {str(path)!r}", path.stat().st_size)


def decode_image(source: Path | io.BytesIO, name: str, size: int) -> Image.Image:
    """An encoded image (a file, or `size` bytes in memory) as upright RGB: its EXIF orientation applied,
    as transformers' `load_image` applies it. A file that is empty, cut short, not an image, or past
    Pillow's size limit is a VLBridgeError naming it (`name`) and what would be right."""
    if size == 0:
        raise VLBridgeError(f"{name} is empty (0 bytes); expected an image Pillow reads (JPEG, PNG, WebP, ...)")
    try:
        with truncated_files_refused(), Image.open(source) as image:
            return to_rgb(ImageOps.exif_transpose(image), name)  # loads the pixels, so truncated files fail here
    except Image.DecompressionBombError as exc:
        raise VLBridgeError(f"{name} is larger than Pillow reads by default ({exc}); downscale it, or raise "
                            "PIL.Image.MAX_IMAGE_PIXELS in your script if you trust the file") from exc
    except UnidentifiedImageError as exc:  # its message names a BytesIO object for in-memory data
        raise VLBridgeError(f"{name} is not an image Pillow reads ({size:,} bytes in no format it knows); expected "
                            "JPEG, PNG, WebP, ...") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # what corrupt files raise
        raise VLBridgeError(f"cannot decode {name}: {exc}; expected an image Pillow reads (JPEG, PNG, WebP, ...)") from exc


def eval_transform(preprocess: Preprocess) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """PIL image or uint8 `(3, H, W)` tensor -> normalised float `(3, S, S)`."""
    return T.Compose([  # resize first: a PIL image is then resized by PIL, as BLIP-2 (LAVIS) does
        *_resize_and_crop(preprocess),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
    ])


def _resize_and_crop(preprocess: Preprocess) -> list[Callable]:
    """Padded to a square first if asked; then 'squash': resize to (R, R); 'shortest': shorter side to R.
    Then centre-crop (S, S) unless already so. (Preprocess refuses any other resize_mode or crop_offset
    when it is made.)"""
    size, mode = preprocess.image_size, preprocess.resize_mode
    target = preprocess.resize_size or size
    steps: list[Callable] = square_padding(preprocess)
    steps.append(T.Resize((target, target) if mode == "squash" else target, interpolation=interpolation_mode(preprocess),
                          antialias=True))
    if mode == "shortest" or target != size:
        steps.append(T.CenterCrop(size) if preprocess.crop_offset == "round" else FloorCenterCrop(size))
    return steps


def square_padding(preprocess: Preprocess) -> list[Callable]:
    """[PadToSquare] where the encoder pads images to squares before anything else, else []."""
    return [] if preprocess.pad_to_square is None else [PadToSquare(preprocess.pad_to_square)]


class PadToSquare:
    """Pad the shorter side with one colour until the image is square, the image centred and an odd
    margin's extra pixel after it (right or bottom): LLaVA-1.5's expand2square, as transformers'
    LlavaImageProcessor(do_pad=True) places it."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = list(fill)

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        height, width = TF.get_size(image)
        if height == width:
            return image
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        return TF.pad(image, [left, top, side - width - left, side - height - top], fill=self.fill)


class FloorCenterCrop:
    """A centre crop to (S, S) whose offsets round down, as transformers' image processors place it
    (torchvision's CenterCrop rounds half a pixel to even: a 503-wide image cropped to 336 starts at
    84 there and at 83 in a CLIPImageProcessor)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        height, width = TF.get_size(image)  # never below the crop: resize_size >= image_size
        return TF.crop(image, (height - self.size) // 2, (width - self.size) // 2, self.size, self.size)


def to_pixel_batch(
    images: ImageInput | Sequence[ImageInput],
    preprocess: Preprocess,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Turn one image or a sequence of images into the encoder's normalised `(B, 3, S, S)` batch."""
    _no_images_problem(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        batch = _check_normalised(images, preprocess, "the batch", dims=4)
    else:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            items: list[ImageInput] = list(images.unbind(0))  # a uint8 (B, 3, H, W) batch of raw images
        else:
            items = [images] if _is_single(images) else list(images)  # type: ignore[arg-type,list-item]
        if not items:
            raise VLBridgeError("no images given; pass at least one PIL image, path or tensor")
        transform = eval_transform(preprocess)
        batch = torch.stack([_one(item, preprocess, transform, f"image {i}") for i, item in enumerate(items)])
    return batch.to(device=device, dtype=dtype or batch.dtype)


def _no_images_problem(images: object) -> None:
    """None (a forgotten argument) is refused by name rather than failing as 'not iterable'."""
    if images is None:
        raise VLBridgeError("images is None; pass a PIL image, a file path, a tensor or a list of them")


def _is_single(images: object) -> bool:
    """One image, not a list of them; an array or bytes counts as one too, so that its refusal names
    it (iterated, an (H, W, 3) array was H 'images' and bytes were ints)."""
    return isinstance(images, (Image.Image, str, os.PathLike, torch.Tensor, np.ndarray, bytes, bytearray))


def _one(item: ImageInput, preprocess: Preprocess, transform: Callable, where: str) -> torch.Tensor:
    """One input -> normalised `(3, S, S)`."""
    if isinstance(item, (str, os.PathLike)):
        return transform(_not_empty(load_image(item), f"image file {str(item)!r}"))
    if isinstance(item, Image.Image):
        return transform(_pil_rgb(_not_empty(item, where), where))
    if isinstance(item, torch.Tensor):
        if item.dtype == torch.uint8:
            if item.dim() != 3 or item.shape[0] != 3 or 0 in item.shape:
                raise VLBridgeError(f"{where}: a uint8 tensor must be raw RGB pixels shaped (3, H, W), H and W at least 1; "
                                    f"got {tuple(item.shape)}")
            return transform(item)
        return _check_normalised(item, preprocess, where, dims=3)
    hint = ""
    if isinstance(item, np.ndarray):
        hint = "; wrap a numpy array as PIL.Image.fromarray(array) (uint8 (H, W, 3)) or torch.from_numpy(array).permute(2, 0, 1)"
    elif isinstance(item, (bytes, bytearray)):
        hint = "; open encoded bytes as PIL.Image.open(io.BytesIO(data))"
    raise VLBridgeError(f"{where}: expected a PIL image, a file path or a tensor, got {type(item).__name__}{hint}")


def _pil_rgb(image: Image.Image, where: str) -> Image.Image:
    """A caller's PIL image as RGB. Its pixels load here, so an image opened lazily from a file that
    is truncated, or closed since (a `with Image.open(...)` block that ended), fails as a named
    error, not as Pillow's bare OSError or an AssertionError without a message."""
    try:
        with truncated_files_refused():
            return to_rgb(image, where)
    except VLBridgeError:
        raise
    except (OSError, ValueError, AssertionError, SyntaxError) as exc:
        raise VLBridgeError(f"{where}: cannot read the PIL image's pixels ({type(exc).__name__}: {exc or 'no message'}); "
                            "a lazily opened image must stay open and its file complete: call image.load() or "
                            "image.convert('RGB') inside the `with Image.open(...)` block, or pass the file's path") from exc


def _not_empty(image: Image.Image, where: str) -> Image.Image:
    """An image with no pixels is refused: resizing one to (S, S) made up pixels and gave a caption."""
    if image.width < 1 or image.height < 1:
        raise VLBridgeError(f"{where} is empty ({image.width}x{image.height} pixels); pass an image at least 1x1")
    return image


def _check_normalised(tensor: torch.Tensor, preprocess: Preprocess, where: str, dims: int) -> torch.Tensor:
    """A float tensor is used as it is, so it must already have the encoder's shape."""
    size = preprocess.image_size
    expected = f"(3, {size}, {size})" if dims == 3 else f"(B, 3, {size}, {size})"
    if not tensor.is_floating_point() or tuple(tensor.shape[-3:]) != (3, size, size) or tensor.dim() != dims:
        raise VLBridgeError(
            f"{where}: a float tensor is taken as already normalised and must be shaped "
            f"{expected}; got {str(tensor.dtype).removeprefix('torch.')} "
            f"{tuple(tensor.shape)} (pass PIL images, paths or uint8 (3, H, W) tensors to have them resized and normalised)"
        )
    if not bool(torch.isfinite(tensor).all()):  # NaN pixels ran through and captioned as "" without a word
        raise VLBridgeError(f"{where}: the float tensor holds NaN or infinite values; normalised pixels must be finite")
    return tensor


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One item per image, whatever the caller passed: a single image, a list, or a (B, 3, H, W) batch."""
    _no_images_problem(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    return [images] if _is_single(images) else list(images)  # type: ignore[arg-type,list-item]
