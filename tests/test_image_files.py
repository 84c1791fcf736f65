"""Odd but valid image files read as transformers reads them, and bad ones refused by name.

Transparency is laid on white (transformers' `convert_to_rgb`), files are read upright by their EXIF
orientation (transformers' `load_image`); an empty, foreign, dangling or directory "image" is named
with what is wrong, for files and for a tar sample's bytes alike.
"""

from __future__ import annotations

import io
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

from vlbridge.data.records import DataError, ImageRef  # noqa: E402
from vlbridge.data.transforms import open_image  # noqa: E402
from vlbridge.errors import VLBridgeError  # noqa: E402
from vlbridge.parts.images import load_image, to_pixel_batch  # noqa: E402
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess  # noqa: E402

PRE = Preprocess(16, CLIP_MEAN, CLIP_STD, "bicubic")
ORIENTATION = 0x0112  # the EXIF tag


def _pixels(seed: int, channels: int = 4, size=(12, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)


def _transparent_files(folder) -> dict[str, object]:
    """One file per way an image can carry transparency, with pixels that are not white under it."""
    px = _pixels(0)
    px[0, 0, 3] = 0  # at least one fully transparent pixel
    Image.fromarray(px, "RGBA").save(folder / "rgba.png")
    Image.fromarray(px[..., [0, 3]].copy(), "LA").save(folder / "la.png")
    palette = Image.fromarray(px[..., :3].copy()).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.save(folder / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    grey = Image.fromarray(px[..., 0].copy(), "L")
    grey.save(folder / "grey-trns.png", transparency=int(px[0, 0, 0]))
    return {name: folder / name for name in ("rgba.png", "la.png", "palette.png", "grey-trns.png")}


def _transformers_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return convert_to_rgb(image, return_numpy=True)


def test_transparency_is_laid_on_white_as_transformers_does(tmp_path):
    for name, path in _transparent_files(tmp_path).items():
        expected = _transformers_rgb(path)
        assert (expected != np.asarray(Image.open(path).convert("RGB"))).any(), name  # the case is not trivial
        assert np.array_equal(np.asarray(load_image(path)), expected), name
        with Image.open(path) as image:  # a PIL image the caller passes: the same colours
            from_pil = to_pixel_batch(image, PRE)
        assert torch.equal(from_pil, to_pixel_batch(path, PRE)), name
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0, 0].tolist() == [255, 255, 255]


def test_a_transparent_grey_of_a_16_bit_png_is_white(tmp_path):
    values = np.array([[0, 1000, 65535], [1000, 30000, 0]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png", transparency=1000)
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16" and image.info.get("transparency") == 1000
    got = np.asarray(load_image(tmp_path / "grey16.png"))[..., 0]
    assert got.tolist() == [[0, 255, 255], [255, 117, 0]]  # 1000 -> white, the rest v / 257


def test_files_are_read_upright_by_their_exif_orientation(tmp_path):
    upright = Image.fromarray(_pixels(1, channels=3, size=(12, 8)))
    exif = upright.getexif()
    exif[ORIENTATION] = 6  # stored turned: a viewer rotates it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "turned.png", exif=exif.tobytes())
    read = load_image(tmp_path / "turned.png")
    assert read.size == (12, 8)
    assert np.array_equal(np.asarray(read), np.asarray(hf_load_image(str(tmp_path / "turned.png"))))
    assert np.array_equal(np.asarray(read), np.asarray(upright))
    data = (tmp_path / "turned.png").read_bytes()  # a tar sample's bytes: the same
    assert np.array_equal(np.asarray(open_image(ImageRef(name="shard.tar:turned", data=data))), np.asarray(upright))
    with Image.open(tmp_path / "turned.png") as image:  # a caller's PIL image is taken as its pixels lie
        assert torch.equal(to_pixel_batch(image, PRE), to_pixel_batch(stored, PRE))


@pytest.mark.parametrize("mode", ["CMYK", "1", "P"])
def test_other_modes_match_transformers(tmp_path, mode):
    image = Image.fromarray(_pixels(2, channels=3)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(hf_load_image(str(path))))


def test_an_animated_gif_is_its_first_frame(tmp_path):
    first, second = (Image.fromarray(_pixels(seed, channels=3)) for seed in (3, 4))
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=50)
    assert np.array_equal(np.asarray(load_image(tmp_path / "anim.gif")), np.asarray(hf_load_image(str(tmp_path / "anim.gif"))))


def test_files_that_are_no_image_say_what_they_are(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    cases = {"empty.jpg": r"'.*empty.jpg' is empty \(0 bytes\); expected an image",
             "notes.jpg": r"'.*notes.jpg' is not an image Pillow reads \(13 bytes in no format it knows\)",
             "folder.jpg": r"'.*folder.jpg' is a directory",
             "link.jpg": r"'.*link.jpg' is a broken link: it points to '.*gone.jpg', which does not exist"}
    for name, message in cases.items():
        with pytest.raises(VLBridgeError, match=message):
            load_image(tmp_path / name)
    with pytest.raises(VLBridgeError, match=r"image file '/dev/null' is not a regular file \(a device, pipe or socket\)"):
        load_image("/dev/null")  # it was said not to exist
    for data, message in ((b"", r"image 'shard.tar:k.jpg' is empty \(0 bytes\)"),
                          (b"not a picture", r"image 'shard.tar:k.jpg' is not an image Pillow reads \(13 bytes")):
        with pytest.raises(DataError, match=message) as caught:
            open_image(ImageRef(name="shard.tar:k.jpg", data=data))
        assert "BytesIO" not in str(caught.value)  # Pillow's own message named an object, not the sample


def test_commands_name_a_dangling_link_as_one(tmp_path, capsys):
    from vlbridge.cli.main import main
    from vlbridge.evaluation.readable import check_images

    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    assert main(["caption", "-a", "tiny-qformer-opt", str(tmp_path / "link.jpg")]) == 2
    err = capsys.readouterr().err
    assert "link.jpg is a broken link: it points to" in err and "Traceback" not in err
    with pytest.raises(VLBridgeError, match=r"link.jpg \(a broken link: it points to '.*gone.jpg', which does not exist\)"):
        check_images([ImageRef(name="link.jpg", path=str(tmp_path / "link.jpg"))])
