"""Images -> normalised (B, 3, S, S) pixel batches, as the encoder's Preprocess says."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vlbridge.errors import VLBridgeError  # noqa: E402
from vlbridge.parts.images import load_image, to_pixel_batch  # noqa: E402
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess  # noqa: E402

PRE = Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic")


def _image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _expected(image: Image.Image, pre: Preprocess = PRE, resample=Image.BICUBIC) -> torch.Tensor:
    """The eval transform written out by hand: PIL resize, [0, 1], (x - mean) / std."""
    resized = np.asarray(image.convert("RGB").resize((pre.image_size, pre.image_size), resample), dtype=np.float32) / 255
    mean, std = np.array(pre.mean, dtype=np.float32), np.array(pre.std, dtype=np.float32)
    return torch.from_numpy((resized - mean) / std).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)


def test_pil_images_are_resized_and_normalised():
    images = [_image(0), _image(1, size=(17, 50))]
    batch = to_pixel_batch(images, PRE)
    assert batch.shape == (2, 3, 28, 28) and batch.dtype == torch.float32
    for got, image in zip(batch, images):
        torch.testing.assert_close(got, _expected(image), atol=1e-5, rtol=0)


def test_bilinear_interpolation_is_honoured():
    pre = Preprocess(28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    image = _image(2)
    torch.testing.assert_close(to_pixel_batch(image, pre)[0], _expected(image, pre, Image.BILINEAR), atol=1e-5, rtol=0)


def test_paths_grayscale_and_rgba_files(tmp_path):
    gray, rgba = _image(3, mode="L"), _image(4, mode="RGBA")
    gray.save(tmp_path / "gray.png")
    rgba.save(tmp_path / "rgba.png")
    batch = to_pixel_batch([tmp_path / "gray.png", str(tmp_path / "rgba.png")], PRE)
    assert batch.shape == (2, 3, 28, 28)
    torch.testing.assert_close(batch[0], _expected(gray), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], _expected(rgba), atol=1e-5, rtol=0)
    assert load_image(tmp_path / "gray.png").mode == "RGB"


def test_uint8_tensors_are_raw_pixels():
    image = _image(5)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    one = to_pixel_batch(raw, PRE)
    two = to_pixel_batch(torch.stack([raw, raw]), PRE)
    assert one.shape == (1, 3, 28, 28) and two.shape == (2, 3, 28, 28)
    # tensors are resized by torch, PIL images by PIL: close, not bit-equal
    assert (one[0] - _expected(image)).abs().mean() < 0.05
    torch.testing.assert_close(two[1], one[0])


def test_float_tensors_are_taken_as_normalised():
    single = torch.randn(3, 28, 28)
    batch = torch.randn(2, 3, 28, 28)
    assert torch.equal(to_pixel_batch(single, PRE)[0], single)
    assert torch.equal(to_pixel_batch(batch, PRE), batch)
    mixed = to_pixel_batch([single, _image(6)], PRE, dtype=torch.bfloat16)
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed[0], single.to(torch.bfloat16))


def test_float_tensor_of_wrong_size_is_refused():
    with pytest.raises(VLBridgeError, match=r"already normalised and must be shaped \(3, 28, 28\); got float32 \(3, 32, 32\)"):
        to_pixel_batch(torch.rand(3, 32, 32), PRE)
    with pytest.raises(VLBridgeError, match=r"\(B, 3, 28, 28\)"):
        to_pixel_batch(torch.rand(2, 1, 28, 28), PRE)


def test_missing_and_unreadable_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(VLBridgeError, match="nope.jpg.*does not exist"):
        to_pixel_batch([_image(7), missing], PRE)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(VLBridgeError, match="image file .*broken.png. is not an image Pillow reads"):
        to_pixel_batch(broken, PRE)
    truncated = tmp_path / "truncated.png"
    _image(8, size=(64, 64)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(VLBridgeError, match="truncated.png"):
        load_image(truncated)


def test_empty_and_unknown_inputs():
    with pytest.raises(VLBridgeError, match="no images given"):
        to_pixel_batch([], PRE)
    with pytest.raises(VLBridgeError, match="image 0: expected a PIL image, a file path or a tensor, got int"):
        to_pixel_batch([3], PRE)


def _torchvision_reference(image, pre: Preprocess, resize) -> torch.Tensor:
    """Resize + CenterCrop + normalise written with torchvision's classic transforms (PIL resizes)."""
    from torchvision import transforms as V

    return V.Compose([V.Resize(resize, interpolation=V.InterpolationMode.BICUBIC), V.CenterCrop(pre.image_size),
                      V.ToTensor(), V.Normalize(pre.mean, pre.std)])(image)


@pytest.mark.parametrize("size", [(50, 30), (20, 45), (28, 28)])  # wide, tall, already square
def test_shortest_side_resize_then_centre_crop(size):
    """CLIP's eval transform (Resize(S) + CenterCrop(S)): the aspect ratio is kept, the middle is cut out."""
    image = _image(9, size=size)
    shortest = Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest")
    torch.testing.assert_close(to_pixel_batch(image, shortest)[0], _torchvision_reference(image, shortest, 28), atol=1e-5, rtol=0)
    larger = Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", resize_size=32)  # DINOv2's: resize 256, crop 224
    torch.testing.assert_close(to_pixel_batch(image, larger)[0], _torchvision_reference(image, larger, 32), atol=1e-5, rtol=0)
    squash_crop = Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "squash", resize_size=32)
    torch.testing.assert_close(to_pixel_batch(image, squash_crop)[0], _torchvision_reference(image, squash_crop, (32, 32)),
                               atol=1e-5, rtol=0)


def test_the_default_stays_a_plain_squash_and_bad_settings_are_refused():
    assert (PRE.resize_mode, PRE.resize_size) == ("squash", None)
    image = _image(10, size=(50, 30))
    torch.testing.assert_close(to_pixel_batch(image, Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "squash", 28))[0],
                               _expected(image), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="resize_size 20 is smaller than image_size 28"):
        Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", 20)
    with pytest.raises(ValueError, match="resize_mode 'longest' is not one of"):  # refused where it is declared
        to_pixel_batch(image, Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "longest"))  # type: ignore[arg-type]


def test_16_bit_images_are_scaled_and_32_bit_ones_refused(tmp_path):
    """Pillow's convert('RGB') clips 16-bit greys at 255: a dark 16-bit PNG came out white."""
    import io

    import numpy as np

    from vlbridge.data.records import DataError, ImageRef
    from vlbridge.data.transforms import open_image
    from vlbridge.parts.images import load_image

    ramp = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = [[[v] * 3 for v in (0, 4, 128, 255)]]
    assert np.asarray(load_image(tmp_path / "g16.png")).tolist() == expected
    data = (tmp_path / "g16.png").read_bytes()
    assert np.asarray(open_image(ImageRef(name="s.tar:g16.png", data=data))).tolist() == expected
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(VLBridgeError, match=r"f.tiff' has floating-point pixels \(Pillow mode 'F'\)"):
        load_image(tmp_path / "f.tiff")
    buffer = io.BytesIO()
    Image.fromarray(np.full((2, 2), 7, dtype=np.int32)).save(buffer, format="TIFF")
    with pytest.raises(DataError, match="32-bit integer pixels"):
        open_image(ImageRef(name="s.tar:i.tiff", data=buffer.getvalue()))


def test_an_image_over_pillows_pixel_limit_is_named_as_too_large(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit, Pillow refuses
    with pytest.raises(VLBridgeError, match="is larger than Pillow reads by default .* downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")


def test_images_without_pixels_are_refused(tmp_path):
    """A 0x0 image was resized to (S, S) out of nothing, and captioned."""
    with pytest.raises(VLBridgeError, match=r"image 0 is empty \(0x0 pixels\)"):
        to_pixel_batch(Image.new("RGB", (0, 0)), PRE)
    with pytest.raises(VLBridgeError, match=r"image 1 is empty \(5x0 pixels\)"):
        to_pixel_batch([_image(0), Image.new("L", (5, 0))], PRE)
    with pytest.raises(VLBridgeError, match=r"H and W at least 1; got \(3, 0, 4\)"):
        to_pixel_batch(torch.zeros(3, 0, 4, dtype=torch.uint8), PRE)


def test_urls_are_refused_as_urls():
    """A URL was reported as a missing file, its '//' collapsed by Path ('https:/example.com/a.png')."""
    with pytest.raises(VLBridgeError, match=r"'https://example.com/a.png' is a URL; vlbridge reads local image files only"):
        to_pixel_batch(["https://example.com/a.png"], PRE)


def test_none_as_images_is_named():
    with pytest.raises(VLBridgeError, match="images is None"):
        to_pixel_batch(None, PRE)  # type: ignore[arg-type]


def test_numpy_arrays_and_bytes_are_refused_as_what_they_are():
    """A single (H, W, 3) array was iterated row by row, and bytes byte by byte ('got int')."""
    array = np.zeros((30, 40, 3), dtype=np.uint8)
    with pytest.raises(VLBridgeError, match=r"image 0: expected .*got ndarray; wrap a numpy array as PIL.Image.fromarray"):
        to_pixel_batch(array, PRE)
    with pytest.raises(VLBridgeError, match=r"got bytes; open encoded bytes as PIL.Image.open"):
        to_pixel_batch(b"\x89PNG", PRE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_normalised_tensors_are_refused(bad):
    """A NaN batch went through the encoder and came out as an empty caption, with no error."""
    batch = torch.zeros(2, 3, 28, 28)
    batch[1, 0, 3, 4] = bad
    with pytest.raises(VLBridgeError, match="the batch: the float tensor holds NaN or infinite values"):
        to_pixel_batch(batch, PRE)
    with pytest.raises(VLBridgeError, match="image 1: the float tensor holds NaN or infinite values"):
        to_pixel_batch(list(batch), PRE)


def test_closed_or_truncated_pil_images_are_named(tmp_path):
    """Pillow failed lazily inside the transform: a bare OSError, or an AssertionError with no message."""
    path = tmp_path / "a.png"
    _image(0).save(path)
    with Image.open(path) as closed:
        pass
    with pytest.raises(VLBridgeError, match=r"image 0: cannot read the PIL image's pixels .*must stay open"):
        to_pixel_batch(closed, PRE)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VLBridgeError, match=r"image 1: cannot read the PIL image's pixels \(OSError"):
        to_pixel_batch([_image(1), Image.open(truncated)], PRE)


def test_truncated_files_are_refused_whoever_set_pillows_flag(tmp_path, monkeypatch):
    """lmms-eval sets ImageFile.LOAD_TRUNCATED_IMAGES on import; a cut-short file then read as whole,
    its missing rows grey, in every vlbridge reader of that process."""
    from PIL import ImageFile

    from vlbridge.data.records import DataError, ImageRef
    from vlbridge.data.transforms import open_image

    full = tmp_path / "full.jpg"
    _image(8, size=(64, 64)).save(full)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(full.read_bytes()[:-200])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(truncated) as image:
        image.load()  # Pillow itself now reads it as whole
    with pytest.raises(VLBridgeError, match="cut.jpg"):
        load_image(truncated)
    with pytest.raises(DataError, match="cannot decode image 'cut'"):
        open_image(ImageRef(name="cut", data=truncated.read_bytes()))
    with pytest.raises(VLBridgeError, match=r"image 0: cannot read the PIL image's pixels"):
        to_pixel_batch([Image.open(truncated)], PRE)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as the caller set it
