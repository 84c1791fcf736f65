"""Annotation files whose texts say nothing, and ids that clash across records, are refused by file
and record: a blank caption trained on an empty target and was scored as a reference without a word."""

from __future__ import annotations

import pytest

from tests.test_data_samples import write_json
from vlbridge.data import DataConfig, DataError, read_coco_captions, read_vqa
from vlbridge.data.build import read_records


@pytest.mark.parametrize("caption, shown", [("", r"' is empty \(''\)"), ("  \n", r"' is blank \('  \\n'\)"), (["a dog", ""], r"\[1\]' is empty \(''\)")])
def test_a_blank_lavis_caption_is_refused_by_record(tmp_path, caption, shown):
    path = write_json(tmp_path / "caps.json", [{"image": "a.jpg", "caption": "a cat"}, {"image": "b.jpg", "caption": caption}])
    with pytest.raises(DataError, match=rf"caption file '.*caps.json', record \[1\]: field 'caption{shown}; give the text, or drop the record"):
        read_coco_captions(path)


def test_blank_captions_of_the_official_and_karpathy_layouts_are_refused(tmp_path):
    official = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "a cat"},
                                                                             {"image_id": 1, "caption": " "}]}
    with pytest.raises(DataError, match=r"annotations\[1\]: field 'caption' is blank"):
        read_coco_captions(write_json(tmp_path / "official.json", official))
    karpathy = {"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a cat"}, {"raw": ""}]}]}
    with pytest.raises(DataError, match=r"images\[0\].sentences\[1\]: field 'raw' is empty"):
        read_coco_captions(write_json(tmp_path / "karpathy.json", karpathy), split="test")


def test_a_blank_question_is_refused(tmp_path):
    questions = {"questions": [{"image_id": 1, "question": "", "question_id": 10}]}
    with pytest.raises(DataError, match=r"questions\[0\]: field 'question' is empty"):
        read_vqa(write_json(tmp_path / "q.json", questions), image_pattern="{image_id}.jpg")
    lavis = [{"image": "a.jpg", "question": "   ", "question_id": 1, "answer": ["yes"]}]
    with pytest.raises(DataError, match=r"record \[0\]: field 'question' is blank"):
        read_vqa(write_json(tmp_path / "lavis.json", lavis))


def test_an_image_id_naming_two_files_names_the_caption_file(tmp_path, capsys):
    from vlbridge.cli.main import main

    path = write_json(tmp_path / "caps.json", [{"image": "a.jpg", "caption": "x", "image_id": 1},
                                               {"image": "b.jpg", "caption": "y", "image_id": 1}])
    config = DataConfig(format="coco", paths=[str(path)])
    with pytest.raises(DataError, match=r"data.paths \['.*caps.json'\]: image id 1 names two images, 'a.jpg' and 'b.jpg'"):
        read_records(config, train=False)
    assert main(["eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"caption file {str(path)!r}: image id 1 names two images" in err and "Traceback" not in err


def test_one_image_file_under_two_ids_is_refused_for_evaluation(tmp_path):
    path = write_json(tmp_path / "caps.json", [{"image": "a.jpg", "caption": "x", "image_id": 1},
                                               {"image": "./a.jpg", "caption": "y", "image_id": 7}])
    config = DataConfig(format="coco", paths=[str(path)])
    with pytest.raises(DataError, match=r"image './a.jpg' is given two ids, 1 and 7: evaluated as two images with the same pixels"):
        read_records(config, train=False)
    assert len(read_records(config, train=True)) == 2  # training pairs are not grouped by image
