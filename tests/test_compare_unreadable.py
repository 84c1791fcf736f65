"""A comparison whose evaluation images include bad ones (a JPEG cut short, a text file named .jpg) is
refused before any run trains, in one error naming every bad image; the evaluation met them only
after the runs had trained. Unlike `vlbridge eval` it offers no skip: every run is scored on one set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_eval_unreadable import bad_set  # noqa: F401 (the fixture: images 2 and 4 of four are bad)
from vlbridge.cli.main import main
from vlbridge.compare.config import CompareConfig
from vlbridge.compare.preflight import preflight
from vlbridge.errors import UnreadableImagesError


def _config(bad_set: dict[str, Path], tmp_path: Path, **split) -> dict:  # noqa: F811
    """One tiny projector run trained on the good images, scored on captions and VQA of all four."""
    good = tmp_path / "train.json"
    good.write_text(json.dumps([{"image": f"{i}.jpg", "image_id": i, "caption": f"picture {i}"} for i in (1, 3)]))
    evals = {"name": "test", "captions": str(bad_set["captions"]), "questions": str(bad_set["questions"]),
             "images": str(bad_set["images"]), **split}
    return {"runs": [{"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 1}], "evals": [evals],
            "stage2_data": {"format": "coco", "paths": [str(good)], "image_root": str(bad_set["images"])},
            "output_dir": str(tmp_path / "out"), "device": "cpu"}


@pytest.fixture
def no_training(monkeypatch):
    def train_run(*args, **kwargs):
        raise AssertionError("a run trained before the evaluation images were checked")

    monkeypatch.setattr("vlbridge.compare.runner.train_run", train_run)


def test_cli_refuses_a_truncated_evaluation_image_before_any_run_trains(bad_set, tmp_path, capsys, no_training):  # noqa: F811
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(_config(bad_set, tmp_path)))
    code = main(["compare", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert "evals.0 (test): 2 of its 4 images cannot be read" in err and "leaves no image out" in err
    assert "2.jpg (image id 2): cannot decode the file" in err and "4.jpg (image id 4): the file is not an image" in err
    assert not (tmp_path / "out" / "runs").exists()


def test_every_bad_image_of_every_split_is_in_the_error(bad_set, tmp_path, no_training):  # noqa: F811
    raw = _config(bad_set, tmp_path, limit=1)  # captions and questions of image 1 only: nothing bad is scored
    preflight(CompareConfig.model_validate(raw))
    raw["evals"].append({**raw["evals"][0], "name": "vqa", "limit": None, "captions": None})
    (bad_set["images"] / "3.jpg").unlink()  # a missing file is named with the rest
    with pytest.raises(UnreadableImagesError) as caught:
        preflight(CompareConfig.model_validate(raw))
    assert [(image.image_id, Path(image.name).name) for image in caught.value.images] == [(2, "2.jpg"), (3, "3.jpg"), (4, "4.jpg")]
    assert "evals.1 (vqa): 3 of its 4 images cannot be read" in str(caught.value) and "evals.0" not in str(caught.value)


def test_the_demo_checks_the_images_before_its_reference_rows_read_them(tmp_path, monkeypatch):
    """The demo's reference rows (the encoder-alone row decodes the test images) wait for the preflight."""
    from vlbridge.compare import baselines, demo, encoder_alone
    from vlbridge.errors import VLBridgeError

    def refused(config):
        raise VLBridgeError("refused by the preflight")

    def too_early(*args, **kwargs):
        raise AssertionError("a reference row was made before the preflight checked the images")

    for module, name in ((demo, "ensure_world"), (demo, "supervised_texts")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    for module, name in ((baselines, "blind_row"), (encoder_alone, "encoder_alone_row")):
        monkeypatch.setattr(module, name, too_early)
    monkeypatch.setattr("vlbridge.compare.run.preflight", refused)
    with pytest.raises(VLBridgeError, match="refused by the preflight"):
        demo.run_demo(tmp_path / "demo", quick=True, say=lambda line: None)
