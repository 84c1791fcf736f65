"""The data layer's readers, text cleaning and config, on sample files written per test."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.test_data_samples import coco_karpathy, sample_members, shards, vqa_files, write_image, write_json, write_jsonl, write_tar
from vlbridge.data import (
    DataConfig,
    DataConfigError,
    DataError,
    ImageText,
    Skipped,
    clean_caption,
    clean_question,
    expand_shards,
    flatten_groups,
    group_captions,
    iter_shard,
    load_data_config,
    read_coco_captions,
    read_jsonl,
    read_vqa,
    stable_image_index,
)
from vlbridge.data.shards import expand_braces
from vlbridge.errors import VLBridgeError


# -- COCO / Flickr30k captions ------------------------------------------------------------------
def test_lavis_karpathy_train_file_gives_one_record_per_caption(tmp_path):
    files = coco_karpathy(tmp_path)
    records = read_coco_captions(files["train"], image_root=files["images"])
    assert [r.text for r in records][:2] == ["A man riding a bike.", "Someone on a bicycle!"]
    assert [r.image_id for r in records] == ["coco_391895", "coco_391895", "coco_522418", "coco_184613"]
    assert records[0].image.path == str(files["images"] / "val2014" / "COCO_val2014_000000391895.jpg")
    assert records[0].image.name == "val2014/COCO_val2014_000000391895.jpg" and Path(records[0].image.path).is_file()


def test_lavis_test_file_with_caption_lists_and_ids_from_file_names(tmp_path):
    files = coco_karpathy(tmp_path)
    records = read_coco_captions(files["test"])  # no image root: paths resolve against the JSON's folder
    assert [(r.image_id, r.text) for r in records] == [
        (391895, "A man riding a bike."), (391895, "A cyclist."), (522418, "A girl eats a donut.")]
    assert records[0].image.path == str(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    groups = group_captions(records)
    assert [(g.image_id, g.captions) for g in groups] == [(391895, ["A man riding a bike.", "A cyclist."]), (522418, ["A girl eats a donut."])]
    flat = flatten_groups(groups)
    assert flat.texts[2] == "A girl eats a donut." and flat.img2txt == [[0, 1], [2]] and flat.txt2img == [0, 0, 1]


def test_lavis_flickr30k_file(tmp_path):
    rows = [{"image": "flickr30k-images/1007129816.jpg", "caption": ["The man with pierced ears.", "A man in glasses."], "image_id": 3}]
    records = read_coco_captions(write_json(tmp_path / "flickr30k_test.json", rows), image_root=tmp_path / "flickr")
    assert [(r.image_id, r.text) for r in records] == [(3, "The man with pierced ears."), (3, "A man in glasses.")]
    assert records[0].image.path == str(tmp_path / "flickr" / "flickr30k-images" / "1007129816.jpg")
    rows[0].pop("image_id")
    assert read_coco_captions(write_json(tmp_path / "f.json", rows))[0].image_id == 1007129816  # from the file name


def test_official_coco_captions_format(tmp_path):
    data = {"images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg"}, {"id": 25, "file_name": "x/b.jpg"}],
            "annotations": [{"image_id": 25, "caption": "a giraffe", "id": 1}, {"image_id": 9, "caption": "food", "id": 2},
                            {"image_id": 25, "caption": "tall animal", "id": 3}]}
    records = read_coco_captions(write_json(tmp_path / "captions_val2014.json", data), image_root=tmp_path / "val2014")
    assert [(r.image_id, r.text, r.extra["annotation_id"]) for r in records] == [(25, "a giraffe", 1), (9, "food", 2), (25, "tall animal", 3)]
    assert records[0].image.path == str(tmp_path / "val2014" / "x" / "b.jpg")
    assert [g.captions for g in group_captions(records)] == [["a giraffe", "tall animal"], ["food"]]
    data["annotations"].append({"image_id": 77, "caption": "orphan"})
    with pytest.raises(DataError, match=r"annotations\[3\]: image_id 77 is not among"):
        read_coco_captions(write_json(tmp_path / "bad.json", data))


def test_karpathy_original_flickr30k_file_with_split(tmp_path):
    def entry(name, split, *raws):
        return {"filename": name, "split": split, "imgid": 0, "sentences": [{"raw": r, "tokens": r.split()} for r in raws]}

    data = {"dataset": "flickr30k", "images": [entry("1000092795.jpg", "train", "Two men.", "Guys outside."),
                                                 entry("10002456.jpg", "restval", "A crowd."), entry("1001773457.jpg", "test", "Dogs.")]}
    path = write_json(tmp_path / "dataset_flickr30k.json", data)
    train = read_coco_captions(path, image_root=tmp_path / "flickr30k-images", split="train")  # train includes restval
    assert [(r.image_id, r.text) for r in train] == [(1000092795, "Two men."), (1000092795, "Guys outside."), (10002456, "A crowd.")]
    assert train[0].image.path == str(tmp_path / "flickr30k-images" / "1000092795.jpg")
    assert [r.image_id for r in read_coco_captions(path, split="test")] == [1001773457]
    assert len(read_coco_captions(path)) == 4
    with pytest.raises(DataError, match="no images with split 'dev'"):
        read_coco_captions(path, split="dev")


def test_split_on_a_one_split_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"LAVIS list layout\) holds one split.*remove split='val'"):
        read_coco_captions(coco_karpathy(tmp_path)["test"], split="val")


def test_caption_file_errors_name_file_position_field_and_record(tmp_path):
    with pytest.raises(DataError, match=r"caption file '.*nope\.json' does not exist"):
        read_coco_captions(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "a.jpg",\n  "caption": "x",}]')
    with pytest.raises(DataError, match=r"bad\.json': malformed JSON at line 2, column 18"):
        read_coco_captions(bad)
    records = [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "captions": ["typo"]}]
    with pytest.raises(DataError, match=r"record \[1\]: missing required field 'caption' \(fields present: 'image', 'captions'\)"):
        read_coco_captions(write_json(tmp_path / "c.json", records))
    with pytest.raises(DataError, match=r"record \[0\]: field 'image' must be a string, got int"):
        read_coco_captions(write_json(tmp_path / "d.json", [{"image": 3, "caption": "x"}]))
    with pytest.raises(DataError, match="not a caption file"):
        read_coco_captions(write_json(tmp_path / "e.json", {"questions": []}))


def test_one_image_id_for_two_files_is_an_error():
    from vlbridge.data import ImageRef

    pairs = [ImageText(ImageRef("a.jpg", path="a.jpg"), "x", 1), ImageText(ImageRef("b.jpg", path="b.jpg"), "y", 1)]
    with pytest.raises(DataError, match="image id 1 names two images, 'a.jpg' and 'b.jpg'"):
        group_captions(pairs)


# -- VQAv2 --------------------------------------------------------------------------------------
def test_vqav2_questions_and_annotations(tmp_path):
    files = vqa_files(tmp_path)
    records = read_vqa(files["questions"], files["annotations"], image_root=files["images"])
    assert [r.question_id for r in records] == [420, 421, 70]
    first = records[0]
    assert first.question == "What color is the Cat?" and first.image_id == 42
    assert first.answers == ["black"] * 9 + ["dark"] and first.answer_type == "other" and first.question_type == "what color is the"
    assert first.extra == {"multiple_choice_answer": "black"}
    assert first.image.path == str(files["images"] / "COCO_val2014_000000000042.jpg") and Path(first.image.path).is_file()


def test_vqav2_test_split_without_answers_and_a_custom_pattern(tmp_path):
    files = vqa_files(tmp_path, with_annotations=False)
    records = read_vqa(files["questions"], image_root=tmp_path, split="test2015", image_pattern="{split}/{image_id}.png")
    assert [r.answers for r in records] == [[], [], []] and records[2].image.path == str(tmp_path / "test2015" / "7.png")
    assert records[0].answer_type is None


def test_vqav2_errors(tmp_path):
    files = vqa_files(tmp_path)
    annotations = json.loads(files["annotations"].read_text())
    annotations["annotations"] = annotations["annotations"][:1]
    partial = write_json(tmp_path / "partial.json", annotations)
    with pytest.raises(DataError, match=r"no answers for 2 of 3 questions .*question_id 421, 70.*same split"):
        read_vqa(files["questions"], partial)
    with pytest.raises(DataError, match=r"image_pattern '\{year\}_\{image_id\}.jpg' .*unknown: \['year'\]"):
        read_vqa(files["questions"], image_pattern="{year}_{image_id}.jpg")
    no_subtype = write_json(tmp_path / "q.json", {"questions": [{"image_id": 1, "question": "why?", "question_id": 1}]})
    with pytest.raises(DataError, match=r"no 'data_subtype' and no split was given.*'val2014'"):
        read_vqa(no_subtype)
    missing_field = write_json(tmp_path / "q2.json", {"questions": [{"image_id": 1, "question_id": 1}]})
    with pytest.raises(DataError, match=r"questions\[0\]: missing required field 'question'"):
        read_vqa(missing_field, split="val2014")


def test_lavis_vqa_list(tmp_path):
    rows = [{"question_id": 5, "question": "What is it?", "answer": ["a cat", "cat"], "image": "val2014/COCO_val2014_000000000042.jpg"}]
    (record,) = read_vqa(write_json(tmp_path / "vqa_val.json", rows), image_root=tmp_path / "coco")
    assert record.answers == ["a cat", "cat"] and record.image_id == 42
    assert record.image.path == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg")


# -- JSONL --------------------------------------------------------------------------------------
def test_jsonl_relative_paths_and_image_root(tmp_path):
    write_image(tmp_path / "set" / "pics" / "a.jpg", 0)
    rows = [{"image": "pics/a.jpg", "text": "A photo."}, {"image": "pics/a.jpg", "text": "Again"},
            {"image": str(tmp_path / "abs.jpg"), "text": "absolute", "image_id": 7, "source": "web"}]
    path = write_jsonl(tmp_path / "set" / "pairs.jsonl", rows)
    records = read_jsonl(path)
    assert records[0].image.path == str(tmp_path / "set" / "pics" / "a.jpg") and Path(records[0].image.path).is_file()
    assert [r.image_id for r in records] == ["pics/a.jpg", "pics/a.jpg", 7] and records[2].extra == {"source": "web"}
    assert records[2].image.path == str(tmp_path / "abs.jpg")
    assert read_jsonl(path, image_root=tmp_path / "elsewhere")[0].image.path == str(tmp_path / "elsewhere" / "pics" / "a.jpg")
    assert [g.captions for g in group_captions(records)] == [["A photo.", "Again"], ["absolute"]]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a.jpg", "text": "x"}\n\n{"image": "b.jpg" "text": "y"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl', line 3: malformed JSON at column 19"):
        read_jsonl(path)
    path.write_text('{"image": "a.jpg", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"line 1: missing required field 'text'"):
        read_jsonl(path)
    path.write_text('["a.jpg", "x"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"image": "a.jpg", "text": "x"}\n{"image": "b.jpg", "text": "y", "text": "z"}\n')  # json keeps the last
    with pytest.raises(DataError, match="line 2: the field 'text' appears twice"):
        read_jsonl(path)


# -- tar shards ---------------------------------------------------------------------------------
def test_brace_glob_and_list_shard_specs(tmp_path):
    assert expand_braces("s-{00008..00011}.tar") == ["s-00008.tar", "s-00009.tar", "s-00010.tar", "s-00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    paths = [str(p) for p in shards(tmp_path)]
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == paths
    assert expand_shards(str(tmp_path / "*.tar")) == paths
    assert expand_shards([paths[2], paths[0]]) == [paths[2], paths[0]]
    assert expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    with pytest.raises(DataError, match=r"2 shard files not found: .*00003\.tar', .*00004\.tar'"):
        expand_shards(str(tmp_path / "{00000..00004}.tar"))
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(str(tmp_path / "*.tgz"))
    with pytest.raises(DataError, match="runs backwards"):
        expand_braces("{9..1}.tar")


def test_shard_samples_are_grouped_by_key_and_incomplete_ones_skipped(tmp_path):
    first, second, _ = shards(tmp_path)
    out = list(iter_shard(str(first)))
    assert [type(x).__name__ for x in out] == ["ImageText", "ImageText", "Skipped", "ImageText"]
    assert out[0].text == "A red Square." and out[0].image_id == f"{first.resolve()}:000000000" and out[0].extra["status"] == "success"
    assert out[1].image.name.endswith("00000.tar:000000001.png") and out[1].image.data[:4] == b"\x89PNG"
    assert out[2].kind == "no text" and out[2].name.endswith("00000.tar:000000002")
    from_json = list(iter_shard(str(second)))[1]
    assert isinstance(from_json, ImageText) and from_json.text == "Caption from JSON"
    no_image = write_tar(tmp_path / "x.tar", [("k1.txt", b"only text"), ("k1.json", b"{}")])
    (skip,) = iter_shard(str(no_image))
    assert skip.kind == "no image" and ".json, .txt" in skip.reason


def test_truncated_tar_yields_what_it_can_then_a_skip(tmp_path):
    whole = write_tar(tmp_path / "t.tar", sample_members("a", 0, "one") + sample_members("b", 1, "two"))
    assert [type(x).__name__ for x in iter_shard(str(whole))] == ["ImageText", "ImageText"]
    data, offsets = whole.read_bytes(), {}
    with tarfile.open(whole) as tar:
        offsets = {member.name: member.offset for member in tar}
    for cut, before in ((offsets["b.txt"], ["one", "no text"]), (offsets["b.jpg"] + 700, ["one"]), (offsets["b.json"] + 100, ["one", "two"])):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        *out, last = iter_shard(str(path))
        assert [x.text if isinstance(x, ImageText) else x.kind for x in out] == before, cut
        assert isinstance(last, Skipped) and last.kind == "unreadable tar" and last.name == str(path)
    damaged = bytearray(data)
    damaged[offsets["b.jpg"] : offsets["b.jpg"] + 100] = b"x" * 100  # a header that is not one
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    *_, last = iter_shard(str(tmp_path / "damaged.tar"))
    assert last.kind == "unreadable tar" and "after 3 members" in last.reason


# -- text, ids, config --------------------------------------------------------------------------
def test_clean_caption_and_question():
    assert clean_caption("  A Man's  bike (red)!\nIt's: fast~ ") == "a man's bike red it's fast"
    assert clean_caption("one, two - three?") == "one, two - three?"  # BLIP keeps , - ? and '
    assert clean_caption(" ".join(["word"] * 60)).count("word") == 50
    assert clean_caption("A b c d", max_words=2) == "a b"
    assert clean_question("What's the Man (left) holding?") == "what's the man left holding?"
    assert clean_question("Is it 3.5 m. long!") == "is it 35 m long"
    with pytest.raises(DataError, match="max_words must be a positive integer"):
        clean_caption("x", max_words=0)


def test_max_words_holds_without_the_cleaning():
    """clean_text: false turned max_words off too, though it says captions are always cut to it."""
    from vlbridge.data.datasets import TextOptions

    raw = TextOptions(clean=False, max_words=3)
    assert raw.caption("A  Man's (red) bike, fast!") == "A Man's (red)"
    assert raw.question("What is  it?") == "What is  it?"  # within the cap: as it is
    assert TextOptions(clean=True, max_words=3).caption("A  Man's (red) bike") == "a man's red"


def test_stable_image_index():
    assert stable_image_index(391895) == 391895
    value = stable_image_index("coco_391895")
    assert value == stable_image_index("coco_391895") and 0 <= value < 2**63
    assert value != stable_image_index("coco_391896")
    for bad in (True, -1, 1.5):
        with pytest.raises(DataError, match="image id"):
            stable_image_index(bad)


def test_data_config_validation_carries_yaml_paths():
    config = load_data_config({"format": "coco", "paths": "train.json", "split": "train"}, where="data.train")
    assert config.paths == ["train.json"] and config.max_words == 50 and config.shuffle is None
    with pytest.raises(DataConfigError) as info:
        load_data_config({"format": "coco", "paths": [], "max_words": 0, "batch": 3}, where="data.train")
    text = str(info.value)
    assert "data.train.paths: List should have at least 1 item" in text and "data.train.max_words:" in text
    assert "data.train.batch: unknown key; valid keys are: format, paths" in text and "(3 problems)" in text
    with pytest.raises(DataConfigError) as info:
        load_data_config({"format": "webdataset", "paths": ["a.tar"], "image_root": "x", "split": "val", "vqa_annotations": "a.json"}, where="data.eval")
    assert info.value.problems == [
        "data.eval.vqa_annotations: only read with format 'vqa', not 'webdataset'",
        "data.eval.split: only used by formats coco and vqa, not 'webdataset'",
        "data.eval.image_root: not used by format 'webdataset' (the images are inside the shards)",
    ]
    with pytest.raises(DataConfigError, match="one annotations file per questions file"):
        load_data_config({"format": "vqa", "paths": ["q1.json", "q2.json"], "vqa_annotations": ["a1.json"]})
    with pytest.raises(DataConfigError, match="data: expected a mapping"):
        load_data_config(["coco"])
    assert isinstance(DataConfigError("x", []), VLBridgeError)
    assert DataConfig.model_fields["strict"].description


def test_readers_and_config_import_no_torch_and_ids_hash_the_same_in_another_process():
    script = ("import sys, vlbridge.data as d; d.load_data_config({'format': 'jsonl', 'paths': 'x.jsonl'}); "
              "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules)); "
              "print(d.stable_image_index('coco_391895'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and int(out[1]) == stable_image_index("coco_391895")  # not Python's per-process str hash


def test_duplicate_ids_in_vqa_and_coco_files_are_errors(tmp_path):
    # a question annotated twice (two files joined twice) would be scored against whichever came last
    files = vqa_files(tmp_path)
    annotations = json.loads(files["annotations"].read_text())
    changed = dict(annotations["annotations"][0], answers=[{"answer": "white", "answer_id": j} for j in range(1, 11)])
    annotations["annotations"].append(changed)
    twice = write_json(tmp_path / "twice.json", annotations)
    with pytest.raises(DataError, match=r"annotations\[3\]: question_id 420 already has answers in .*annotations\[0\]"):
        read_vqa(files["questions"], twice)
    questions = json.loads(files["questions"].read_text())
    questions["questions"].append(dict(questions["questions"][0], question="Another question?"))
    with pytest.raises(DataError, match=r"questions\[3\]: question_id 420 is already questions\[0\]"):
        read_vqa(write_json(tmp_path / "q.json", questions), files["annotations"])
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a cat", "id": 1}]}
    with pytest.raises(DataError, match=r"images\[1\]: image id 1 names two images, 'a.jpg' and 'b.jpg'"):
        read_coco_captions(write_json(tmp_path / "captions.json", coco))
    coco["images"][1]["file_name"] = "a.jpg"  # listed twice as the same file: harmless
    assert [r.text for r in read_coco_captions(write_json(tmp_path / "captions2.json", coco))] == ["a cat"]


def test_shard_samples_with_a_blank_caption_are_skipped_as_no_text(tmp_path):
    # img2dataset writes an empty KEY.txt for a row without a caption; it is not a caption to train on
    members = (sample_members("a", 0, "") + sample_members("b", 1, "  \n") + sample_members("c", 2, "", meta={"caption": "from json"})
               + sample_members("d", 3, None, meta={"caption": " "}) + sample_members("e", 4, "kept")
               + sample_members("f", 5, "", meta={"text_input": "What is it?", "text_output": "a cat"}))
    out = list(iter_shard(str(write_tar(tmp_path / "blank.tar", members))))
    assert [x.text if isinstance(x, ImageText) else x.kind for x in out] == ["no text", "no text", "from json", "no text", "kept", ""]
    assert out[-1].extra["text_output"] == "a cat"  # instruction data needs no caption (as in JSONL)
