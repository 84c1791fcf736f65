"""One image file listed under two image ids trains as one image in stage 1: its pairs are positives
of each other (ITC targets) and never each other's hard negative (ITM), whatever ids the data gives.

Before, the ids made them two images: the copy was pushed apart from itself and could be drawn as its
own "non-matching" hard negative. Evaluation refuses such data (`group_captions`); training uses it
as one image and says so once (DataWarning).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlbridge.cli.main import main
from vlbridge.data import read_coco_captions, read_jsonl
from vlbridge.data.batching import collate
from vlbridge.data.datasets import RecordDataset
from vlbridge.data.records import DataError, ImageRef, ImageText, group_captions, ids_sharing_files
from vlbridge.errors import DataWarning
from vlbridge.train.losses import image_positives, sample_hard_negatives

from tests.test_trainer_samples import config, write_config

ROWS = [  # ids 1 and 2 name one file (spelt two ways); 3 and 4 have files of their own
    {"image": "images/red.png", "text": "a red square", "image_id": 1},
    {"image": "images/./red.png", "text": "a square of red", "image_id": 2},
    {"image": "images/blue.png", "text": "a blue square", "image_id": 3},
    {"image": "images/green.png", "text": "a green square", "image_id": 4},
]


def write_data(root: Path) -> Path:
    """root/train.jsonl over three solid 8 x 8 images, one of them under ids 1 and 2."""
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220)), ("green", (20, 200, 20))):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(root / "images" / f"{name}.png")
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return root / "train.jsonl"


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.zeros(3, 2, 2)


def test_ids_sharing_a_file_map_to_the_first_and_chains_join():
    def pair(path: str, image_id: int) -> ImageText:
        return ImageText(ImageRef(name=path, path=path), "a caption", image_id)

    assert ids_sharing_files([pair("/d/a.jpg", 1), pair("/d/b.jpg", 2), pair("/d/./a.jpg", 3)]) == {3: 1}
    # 5 names b and c, so 2 (b) and 6 (c) are one image with it, as the first-seen 2 stands for all
    assert ids_sharing_files([pair("/d/b.jpg", 2), pair("/d/c.jpg", 6), pair("/d/b.jpg", 5), pair("/d/c.jpg", 5)]) == {5: 2, 6: 2}


def test_a_stage1_batch_treats_one_file_under_two_ids_as_one_image(tmp_path: Path):
    records = read_jsonl(write_data(tmp_path))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        dataset = RecordDataset(records, pixels)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["image_id"] == [1, 2, 3, 4]  # the data's ids are kept; only the image index is shared
    ids = batch["image_index"]
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 3
    assert batch["image_captions"][0] == batch["image_captions"][1] == ("a red square", "a square of red")

    same = image_positives(ids, ids)  # ITC's targets and ITM's excluded pairs
    assert same.i2t[0, 1] and same.i2t[1, 0] and same.t2i[0, 1] and same.t2i[1, 0]
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = 50.0  # the copy is by far the most similar: it would be drawn nearly always
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        negatives = sample_hard_negatives(sim, sim, ids, ids, generator)
        assert negatives.images[0] not in (0, 1) and negatives.images[1] not in (0, 1)
        assert negatives.texts[0] not in (0, 1) and negatives.texts[1] not in (0, 1)

    [warning] = [w for w in said if issubclass(w.category, DataWarning)]
    assert re.search(r"^1 image id\(s\) name an image file that another id names too \(e.g. 'images/red.png' is listed "
                     r"under ids 1 and 2\).*give each image file one id", str(warning.message))


def test_vlbridge_train_runs_stage1_on_it_and_says_so_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_data(tmp_path / "data")
    values = config(data.parent, tmp_path / "run", steps=1, log_every=1, schedule={"warmup_steps": 0})
    values["data"]["train"]["paths"] = [str(data)]
    assert main(["train", str(write_config(tmp_path / "train.yaml", values))]) == 0
    err = capsys.readouterr().err
    assert err.count("vlbridge train: warning: 1 image id(s) name an image file that another id names too") == 1
    assert "DataWarning" not in err


def write_two_files_one_id(root: Path) -> Path:
    """A LAVIS-style caption list whose explicit image_id 7 names two different pictures."""
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(root / "images" / f"{name}.png")
    rows = [{"image": "images/red.png", "caption": "a red square", "image_id": 7},
            {"image": "images/./red.png", "caption": "a square of red", "image_id": 7},  # the same file: fine
            {"image": "images/blue.png", "caption": "a blue square", "image_id": 7}]
    (root / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    return root / "train.json"


def test_one_id_naming_two_files_is_refused_for_training(tmp_path: Path):
    """Training took the two pictures for one image (one image_index): each was the other's ITC positive."""
    records = read_coco_captions(write_two_files_one_id(tmp_path))
    with pytest.raises(DataError, match=r"^image id 7 names two images, 'images/red.png' and 'images/blue.png' \(training takes an "
                                        r"id for one image: each would be the other's ITC positive.*\); each image id must belong "
                                        r"to one image file$"):
        RecordDataset(records, pixels)
    RecordDataset(records[:2], pixels)  # one file, spelt two ways, under one id: one image
    [group] = group_captions(records[:2])  # evaluation refused that as "two images"
    assert group.captions == ["a red square", "a square of red"]


def test_vlbridge_train_check_refuses_one_id_naming_two_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_two_files_one_id(tmp_path / "data")
    values = config(data.parent, tmp_path / "run")
    values["data"]["train"] = {"format": "coco", "paths": [str(data)], "num_workers": 0}
    assert main(["train", str(write_config(tmp_path / "train.yaml", values)), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"data.train.paths ['{data}']: image id 7 names two images, 'images/red.png' and 'images/blue.png'" in err
    assert "Traceback" not in err and err.strip().count("\n") == 0  # one paragraph
