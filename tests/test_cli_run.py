"""`vlbridge caption`, `ask`, `retrieve`, `import` and `export` from the command line, on tiny models."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from tests import hf_tiny
from vlbridge.cli.main import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, colour in [("red.png", (220, 20, 20)), ("blue.jpg", (20, 20, 220))]:
        Image.new("RGB", (48, 40), colour).save(root / name)
        paths.append(str(root / name))
    return paths


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_a_tiny_preset(capsys, images):
    code, out, err = run(capsys, "caption", "--assembly", "tiny-qformer-opt", "--max-new-tokens", "4", "--num-beams", "2", "--json", *images)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == images and all(isinstance(r["caption"], str) for r in rows)


def test_ask_and_retrieve(capsys, images):
    code, out, err = run(capsys, "ask", "-a", "tiny-qformer-flan-t5", "-q", "what colour is it?", "--max-new-tokens", "3", *images)
    assert code == 0, err
    assert "what colour is it?" in out and "ANSWER" in out
    code, out, err = run(capsys, "retrieve", "-a", "tiny-qformer-opt", "-t", "a red square", "-t", "a blue square", "--k", "2", "--json", *images)
    assert code == 0, err
    data = json.loads(out)
    assert len(data["image_to_text"]) == 2 and len(data["itc"]) == 2 and len(data["itc"][0]) == 2
    # text->image re-ranks its own shortlist: its scores are not i2t's transposed, and were missing
    code, out, err = run(capsys, "retrieve", "-a", "tiny-qformer-opt", "-t", "a red square", "-t", "blue", "-t", "x", "--k", "1",
                         "--json", *images)
    data = json.loads(out)
    assert len(data["t2i"]) == 3 and all(len(row) == 2 for row in data["t2i"])
    assert all(sum(score != -100.0 for score in row) == 1 for row in data["t2i"])


def test_run_errors_exit_2(capsys, images, tmp_path):
    code, _, err = run(capsys, "caption", "-a", "tiny-qformer-opt", str(tmp_path / "nope.png"))
    assert code == 2 and f"image {tmp_path / 'nope.png'} does not exist" in err
    (tmp_path / "gone.png").symlink_to(tmp_path / "nope.png")
    code, _, err = run(capsys, "caption", "-a", "tiny-qformer-opt", str(tmp_path / "gone.png"))
    assert code == 2 and "gone.png is a broken link: it points to" in err and "not found" not in err
    code, _, err = run(capsys, "caption", "-a", "tiny-qformer-opt", os.devnull)  # was 'image not found: /dev/null is not a regular file'
    assert code == 2 and f"image {os.devnull} is not a regular file (a device, pipe or socket)" in err and "not found" not in err
    code, _, err = run(capsys, "caption", "-a", "tiny-qformer-opt", "https://example.com/cat.jpg")
    assert code == 2 and "'https://example.com/cat.jpg' is a URL; vlbridge reads local image files only" in err  # was 'image not found'
    code, _, err = run(capsys, "retrieve", "-a", "tiny-mlp-opt", "-t", "x", images[0])
    assert code == 2 and "need a Q-Former connector" in err
    code, _, err = run(capsys, "caption", "-a", "no-such-preset", images[0])
    assert code == 2 and "no assembly file or preset named 'no-such-preset'" in err
    code, _, err = run(capsys, "caption", "-c", str(tmp_path), images[0])
    assert code == 2 and "is not a vlbridge checkpoint" in err


def test_import_then_caption_then_export(capsys, images, tmp_path):
    hf_tiny.make_generation_model(tmp_path / "hf")
    code, out, err = run(capsys, "import", "hf-blip2", str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert code == 0, err and "wrote vlbridge checkpoint" in out
    code, out, err = run(capsys, "caption", "-c", str(tmp_path / "ours"), "--max-new-tokens", "3", *images)
    assert code == 0, err
    code, out, err = run(capsys, "export", "hf-blip2", str(tmp_path / "ours"), str(tmp_path / "back"))
    assert code == 0, err
    assert (tmp_path / "back" / "config.json").is_file()
    code, _, err = run(capsys, "import", "hf-blip2", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert code == 2 and "not a directory" in err


def test_a_quoted_home_in_an_image_path_is_expanded(capsys, images, monkeypatch):
    """`vlbridge caption '~/x.png'` (the shell leaves a quoted ~ alone) read as 'image not found'."""
    from pathlib import Path

    monkeypatch.setenv("HOME", str(Path(images[0]).parent))
    code, out, err = run(capsys, "caption", "-a", "tiny-linear-opt", "--max-new-tokens", "2", "--num-beams", "1", "--json", "~/red.png")
    assert code == 0, err
    assert json.loads(out)[0]["image"] == images[0]
