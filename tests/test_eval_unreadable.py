"""Evaluation sets with images that cannot be read: every bad image is found before the model runs and
named in one error; `skip_unreadable` (`--skip-unreadable`) evaluates the rest and records what it left out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.test_eval import KnownModel
from vlbridge.cli.main import main
from vlbridge.evaluation import tasks as evaluate
from vlbridge.errors import UnreadableImagesError

GOOD, TRUNCATED, NOT_AN_IMAGE = (1, 3), 2, 4  # image ids; 2 and 4 are the bad files


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture
def bad_set(tmp_path: Path) -> dict[str, Path]:
    """Four images, two of them bad (a JPEG cut short, a text file named .jpg); captions and VQA questions."""
    images = tmp_path / "images"
    images.mkdir()
    for image_id in GOOD:
        (images / f"{image_id}.jpg").write_bytes(_jpeg((200, 40 * image_id, 20)))
    whole = _jpeg((20, 20, 200))
    (images / f"{TRUNCATED}.jpg").write_bytes(whole[: len(whole) // 2])
    (images / f"{NOT_AN_IMAGE}.jpg").write_text("not an image")
    ids = range(1, 5)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"image": f"{i}.jpg", "image_id": i, "caption": [f"picture {i}", f"image {i}"]} for i in ids]))
    questions = tmp_path / "questions.json"  # LAVIS's list: two questions per image
    questions.write_text(json.dumps([{"question_id": 10 * i + q, "image": f"{i}.jpg", "question": f"what is {q}?",
                                      "answer": ["yes"] * 10} for i in ids for q in (1, 2)]))
    return {"images": images, "captions": captions, "questions": questions}


def test_every_bad_image_is_in_one_error_before_the_model_runs(bad_set):
    groups = evaluate.load_caption_groups(bad_set["captions"], bad_set["images"])
    model = KnownModel(captions={})
    with pytest.raises(UnreadableImagesError) as caught:
        evaluate.run_captions(model, groups, tokenizer="python-ptb-approx", meteor=False)
    assert model.calls == []  # not one batch ran
    assert [(image.image_id, Path(image.name).name) for image in caught.value.images] == [(2, "2.jpg"), (4, "4.jpg")]
    message = str(caught.value)
    assert message.startswith("2 of the 4 images cannot be read") and "--skip-unreadable" in message
    assert "2.jpg (image id 2): cannot decode the file" in message and "4.jpg (image id 4): the file is not an image" in message


def test_skip_unreadable_answers_the_rest_and_records_what_it_left_out(bad_set):
    records = evaluate.load_vqa_records(bad_set["questions"], images=bad_set["images"])
    result = evaluate.run_vqa(KnownModel(answers={"what is 1?": "yes", "what is 2?": "no"}), records, skip_unreadable=True)
    assert [p["question_id"] for p in result.predictions] == [11, 12, 31, 32]
    m = result.metrics
    assert m["overall"] == 50.0 and m["num_questions"] == 4
    assert m["left_out"]["count"] == 2 and m["left_out"]["image_ids"] == [2, 4] and m["left_out"]["questions"] == 4
    assert [Path(image["name"]).name for image in m["left_out"]["images"]] == ["2.jpg", "4.jpg"]
    assert any("2 unreadable image(s) left out" in note and "not comparable" in note for note in m["notes"])


def test_skip_unreadable_leaves_missing_files_out_too(bad_set):
    (bad_set["images"] / "3.jpg").unlink()
    groups = evaluate.load_caption_groups(bad_set["captions"], bad_set["images"])
    with pytest.raises(evaluate.VLBridgeError, match="(?s)1 image file\\(s\\) not found.*--skip-unreadable"):
        evaluate.run_captions(KnownModel(captions={}), groups)  # missing: said at once, with where to point --images
    result = evaluate.run_captions(KnownModel(captions={"1.jpg": "picture 1"}), groups, skip_unreadable=True,
                                   tokenizer="python-ptb-approx", meteor=False)
    assert result.metrics["num_images"] == 1 and result.metrics["left_out"]["image_ids"] == [2, 3, 4]
    assert "does not exist" in result.metrics["left_out"]["images"][1]["reason"]


def test_cli_names_both_bad_images_and_exits_2_before_loading_the_model(bad_set, capsys, monkeypatch):
    def no_model(source):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr("vlbridge.cli.evaluate.open_model", no_model)
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", str(bad_set["captions"]),
                 "--images", str(bad_set["images"]), "--no-meteor"])
    err = capsys.readouterr().err
    assert code == 2 and "error: 2 of the 4 images cannot be read" in err and "Traceback" not in err
    assert "2.jpg (image id 2)" in err and "4.jpg (image id 4)" in err and "--skip-unreadable" in err


def test_cli_skip_unreadable_records_the_left_out_ids(bad_set, capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", str(bad_set["captions"]),
                 "--images", str(bad_set["images"]), "--skip-unreadable", "--out", str(out), "--no-meteor",
                 "--num-beams", "1", "--max-new-tokens", "2", "--tokenizer", "python-ptb-approx", "--quiet"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["left_out"]["image_ids"] == [2, 4] and metrics["left_out"]["count"] == 2 and metrics["num_images"] == 2
    assert metrics["run"]["options"]["skip_unreadable"] is True
    assert sorted(p["image_id"] for p in json.loads((out / "predictions.json").read_text())) == [1, 3]
    assert "note: skip_unreadable: 2 unreadable image(s) left out (image ids 2, 4" in stdout


def test_retrieval_refuses_what_skip_unreadable_leaves_when_fewer_than_2_images(bad_set):
    (bad_set["images"] / "3.jpg").unlink()  # image 1 is the only readable one left
    groups = evaluate.load_caption_groups(bad_set["captions"], bad_set["images"])
    model = KnownModel(scores=[[1.0, 0.5]])  # one image, its two captions: it would score 100%
    with pytest.raises(evaluate.VLBridgeError, match="fewer than 2 images always finds the right one: 1 image\\(s\\) left after "
                                                     "--skip-unreadable \\(skip_unreadable\\) left out 3 unreadable"):
        evaluate.run_retrieval(model, groups, skip_unreadable=True)
    with pytest.raises(evaluate.VLBridgeError, match="fewer than 2 images always finds the right one: the set holds 1"):
        evaluate.run_retrieval(model, groups[:1])  # the same rule for a set of one image, as --limit 1 is refused


def test_cli_retrieval_refuses_fewer_than_2_readable_images_before_loading_the_model(bad_set, capsys, monkeypatch):
    def no_model(source):
        raise AssertionError("the model was loaded for a retrieval among one image")

    (bad_set["images"] / "3.jpg").unlink()
    monkeypatch.setattr("vlbridge.cli.evaluate.open_model", no_model)
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "retrieval", "--data", str(bad_set["captions"]),
                 "--images", str(bad_set["images"]), "--skip-unreadable", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "1 image(s) left after --skip-unreadable" in err, err
    assert "left out 3 unreadable one(s)" in err and "2.jpg (image id 2)" in err and "3.jpg (image id 3)" in err
