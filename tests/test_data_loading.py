"""Transforms, datasets, collate, DataLoader workers and the resumable order, on sample files."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.test_data_samples import coco_karpathy, image, sample_members, shards, vqa_files, write_image, write_tar, write_truncated  # noqa: E402
from vlbridge.data import (  # noqa: E402
    DataError,
    DataProgress,
    ImageRef,
    ImageText,
    RecordDataset,
    ResumableSampler,
    Skipped,
    build_dataset,
    collate,
    epoch_order,
    eval_transform,
    make_loader,
    read_coco_captions,
    stable_image_index,
    train_transform,
)
from vlbridge.parts.images import to_pixel_batch  # noqa: E402
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess  # noqa: E402

PRE = Preprocess(16, CLIP_MEAN, CLIP_STD, "bicubic")


def _epoch(loader, progress: DataProgress | None = None) -> list[dict]:
    batches = list(loader)
    for batch in batches:
        if progress is not None:
            progress.observe(batch)
    return batches


def _indices(batches: list[dict]) -> list[int]:
    return [i for batch in batches for i in batch["index"].tolist()]


# -- transforms ---------------------------------------------------------------------------------
def test_eval_transform_matches_vlbridge_images(tmp_path):
    path = write_image(tmp_path / "a.png", 3, "PNG")
    dataset = RecordDataset([ImageText(ImageRef("a.png", path=str(path)), "x", 1)], eval_transform(PRE))
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    torch.testing.assert_close(item["pixel_values"], to_pixel_batch(path, PRE)[0], atol=0, rtol=0)
    in_memory = RecordDataset([ImageText(ImageRef("a.png", data=path.read_bytes()), "x", 1)], eval_transform(PRE))[0]
    torch.testing.assert_close(in_memory["pixel_values"], item["pixel_values"], atol=0, rtol=0)


def test_train_transform_is_random_but_seeded():
    transform, picture = train_transform(PRE), image(0, size=(40, 30))

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([transform(picture) for _ in range(4)])

    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (4, 3, 16, 16) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other) and not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], eval_transform(PRE)(picture))
    low = (0 - max(CLIP_MEAN)) / min(CLIP_STD)
    high = (1 - min(CLIP_MEAN)) / min(CLIP_STD)
    assert low - 1e-4 <= first.min() and first.max() <= high + 1e-4  # scaled to [0, 1], then normalised
    with pytest.raises(ValueError, match="interpolation 'nearest' is not one of"):  # refused where it is declared
        train_transform(Preprocess(16, CLIP_MEAN, CLIP_STD, "nearest"))  # type: ignore[arg-type]


def test_train_crop_covers_at_least_half_the_image():
    # A picture whose left half is black and right half white: a crop of >= half the area, resized,
    # must contain some of each unless it lies entirely in one half, which scale >= 0.5 forbids here.
    picture = image(0, size=(64, 16)).point(lambda _: 0)
    picture.paste((255, 255, 255), (32, 0, 64, 16))
    transform = train_transform(Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear"))
    torch.manual_seed(0)
    for _ in range(20):
        pixels = transform(picture)
        assert pixels.min() < 0.1 and pixels.max() > 0.9


def test_train_transform_pads_to_a_square_where_the_encoder_does():
    """An encoder that pads images to squares for eval (LLaVA-1.5's 'pad') trained on crops of the bare
    image. A white 64 x 8 strip padded to 64 x 64 is mostly padding: any crop of half its area holds some."""
    picture = image(0, size=(64, 8)).point(lambda _: 255)
    transform = train_transform(Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", pad_to_square=(0, 0, 0)))
    torch.manual_seed(0)
    for _ in range(10):
        pixels = transform(picture)
        assert pixels.min() < 0.1 and pixels.max() > 0.9


# -- datasets, skipping and collate ------------------------------------------------------------
def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    files = coco_karpathy(tmp_path, broken=True)
    records = read_coco_captions(files["train"], image_root=files["images"])
    dataset = RecordDataset(records, eval_transform(PRE))
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["consumed"] == 6
    assert batch["text"][0] == "a man riding a bike" and batch["image_id"][0] == "coco_391895"
    assert [s.name for s in batch["skipped"]] == [str(files["images"] / "val2014" / n) for n in ("broken.jpg", "missing.jpg")]
    progress = DataProgress()
    progress.observe(batch)
    assert progress.skipped_count == 2 and progress.skip_counts == {"unreadable image": 2}
    assert progress.summary().startswith(f"2 samples skipped (unreadable image: 2): {files['images']}/val2014/broken.jpg, ")
    assert DataProgress().summary() == "no samples skipped"
    strict = RecordDataset(records, eval_transform(PRE), strict=True)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        strict[4]
    with pytest.raises(DataError, match=r"image file '.*missing\.jpg' does not exist"):
        strict[5]


def test_string_image_ids_become_shared_integer_indices(tmp_path):
    files = coco_karpathy(tmp_path)
    dataset = RecordDataset(read_coco_captions(files["train"], files["images"]), eval_transform(PRE))
    batch = collate([dataset[i] for i in range(4)])
    index = batch["image_index"]
    assert index.dtype == torch.long and index.tolist() == [stable_image_index(i) for i in batch["image_id"]]
    assert index[0] == index[1] and len(set(index.tolist())) == 3  # captions 0 and 1 share an image
    assert batch["index"].tolist() == [0, 1, 2, 3]
    # every caption of its image (what stage 1's positives: caption reads), the same for both of image 0's pairs
    assert batch["image_captions"][0] == batch["image_captions"][1] == tuple(batch["text"][:2])
    assert batch["text"][2] in batch["image_captions"][2] and batch["text"][0] not in batch["image_captions"][2]


def test_all_skipped_batch_is_empty_but_counted():
    batch = collate([Skipped("a.jpg", "broken", index=3), Skipped("b.jpg", "broken", index=4)])
    assert batch["pixel_values"].shape[0] == 0 and len(batch["index"]) == 0 and batch["consumed"] == 2
    assert [s.index for s in batch["skipped"]] == [3, 4]


def test_eval_datasets_group_captions_and_vqa_items(tmp_path):
    files = coco_karpathy(tmp_path / "coco")
    groups = build_dataset({"format": "coco", "paths": [str(files["test"])], "image_root": str(files["images"])}, PRE, train=False)
    assert len(groups) == 2 and groups[0]["captions"] == ["a man riding a bike", "a cyclist"] and groups[0]["image_id"] == 391895
    vqa = vqa_files(tmp_path / "vqa")
    config = {"format": "vqa", "paths": str(vqa["questions"]), "vqa_annotations": str(vqa["annotations"]), "image_root": str(vqa["images"])}
    item = build_dataset(config, PRE, train=False)[1]
    assert item["question"] == "is it really sleeping?" and item["answers"] == ["yes"] * 10 and item["question_id"] == 421
    assert item["answer_type"] == "yes/no" and item["pixel_values"].shape == (3, 16, 16)
    batch = collate([build_dataset(config, PRE, train=True)[i] for i in range(3)])
    assert batch["question_id"] == [420, 421, 70] and batch["image_index"].tolist() == [42, 42, 7]


def test_build_errors_name_the_yaml_path(tmp_path):
    with pytest.raises(DataError, match=r"data\.train\.paths\[1\]: caption file '.*nope\.json' does not exist"):
        build_dataset({"format": "coco", "paths": [str(coco_karpathy(tmp_path)["train"]), str(tmp_path / "nope.json")]}, PRE, True, where="data.train")
    with pytest.raises(DataError, match=r"data\.image_root: .* is not a directory"):
        build_dataset({"format": "jsonl", "paths": "x.jsonl", "image_root": str(tmp_path / "none")}, PRE, True)
    with pytest.raises(DataError, match=r"data\.eval\.paths\[0\]: 1 shard file not found"):
        build_dataset({"format": "webdataset", "paths": str(tmp_path / "s-{0..0}.tar")}, PRE, False, where="data.eval")


# -- order and resume ---------------------------------------------------------------------------
def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(50, seed=3, epoch=1)
    assert sorted(order) == list(range(50)) and order == epoch_order(50, seed=3, epoch=1)
    assert order != epoch_order(50, seed=3, epoch=2) and order != epoch_order(50, seed=4, epoch=1)
    assert epoch_order(5, seed=3, epoch=1, shuffle=False) == [0, 1, 2, 3, 4]


def test_sampler_splits_ranks_evenly_and_resumes_mid_epoch():
    ranks = [ResumableSampler(10, shuffle=True, seed=1, rank=r, world_size=4) for r in range(4)]
    for sampler in ranks:
        sampler.set_epoch(2)
    orders = [list(s) for s in ranks]
    assert [len(o) for o in orders] == [3, 3, 3, 3] and set(sum(orders, [])) == set(range(10))  # 2 padded repeats
    ranks[1].set_epoch(2, start=2)
    assert list(ranks[1]) == orders[1][2:] and len(ranks[1]) == 1
    with pytest.raises(DataError, match="cannot start at sample 4 of an epoch of 3"):
        ranks[1].set_epoch(2, start=4)
    dropped = ResumableSampler(10, shuffle=False, rank=3, world_size=4, drop_last=True)
    assert list(dropped) == [3, 7]


def test_map_style_loader_with_two_workers_resumes_at_the_data_position(tmp_path):
    files = coco_karpathy(tmp_path, broken=True)
    config = {"format": "coco", "paths": [str(files["train"])], "image_root": str(files["images"]), "num_workers": 2}
    dataset = build_dataset(config, PRE, train=True)
    progress = DataProgress(epoch=1)
    full = _epoch(make_loader(dataset, 2, epoch=1, seed=7, num_workers=2), progress)
    assert progress.samples == 6 and progress.skipped_count == 2 and progress.skip_counts == {"unreadable image": 2}
    assert sorted(_indices(full)) == [0, 1, 2, 3] and full[0]["pixel_values"].shape[1:] == (3, 16, 16)
    again = _epoch(make_loader(dataset, 2, epoch=1, seed=7, num_workers=2))
    assert _indices(again) == _indices(full)
    torch.testing.assert_close(again[0]["pixel_values"], full[0]["pixel_values"])  # seeded augmentations
    position = DataProgress(epoch=1)
    position.observe(full[0])
    resumed = _epoch(make_loader(dataset, 2, epoch=1, seed=7, num_workers=2, resume=position.state_dict()))
    assert _indices(resumed) == _indices(full[1:])
    with pytest.raises(DataError, match="resume position is in epoch 1, not 2"):
        make_loader(dataset, 2, epoch=2, resume=position)


def test_shard_stream_with_two_workers_skips_counts_and_resumes(tmp_path):
    shards(tmp_path)
    config = {"format": "webdataset", "paths": [str(tmp_path / "{00000..00002}.tar")], "shuffle_buffer": 3}
    dataset = build_dataset(config, PRE, train=True)
    progress = DataProgress()
    full = _epoch(make_loader(dataset, 2, seed=5, num_workers=2), progress)
    texts = sorted(t for batch in full for t in batch["text"])
    assert texts == ["a blue one", "a red square", "caption from json", "first of shard one", "shard two, one", "shard two, two", "third"]
    assert progress.skip_counts == {"no text": 1, "unreadable image": 1} and progress.samples == 9
    assert set(progress.streams) == {"0/2", "1/2"} and sum(progress.streams.values()) == 9
    assert len(set(_indices(full))) == 7
    assert _indices(_epoch(make_loader(dataset, 2, seed=5, num_workers=2))) == _indices(full)
    assert _indices(_epoch(make_loader(dataset, 2, seed=5, epoch=1, num_workers=2))) != _indices(full)
    position = DataProgress()
    for batch in full[:3]:
        position.observe(batch)
    resumed = _epoch(make_loader(dataset, 2, seed=5, num_workers=2, resume=position))
    assert _indices(resumed) == _indices(full[3:])
    with pytest.raises(DataError, match="different number of DataLoader workers"):
        _epoch(make_loader(dataset, 2, seed=5, num_workers=0, resume=position))


def test_resumed_shard_stream_continues_in_the_same_batch_order(tmp_path):
    for s in range(4):  # 4 shards x 4 samples: each of 2 workers gives 4 batches of 2, alternating
        write_tar(tmp_path / f"{s:05d}.tar", [m for i in range(4) for m in sample_members(f"{s}{i:04d}", 10 * s + i, f"s{s} i{i}")])
    dataset = build_dataset({"format": "webdataset", "paths": str(tmp_path / "*.tar"), "shuffle_buffer": 4}, PRE, train=True)
    full = _epoch(make_loader(dataset, 2, seed=1, num_workers=2))
    assert [list(b["streams"]) for b in full[:3]] == [["0/2"], ["1/2"], ["0/2"]] and len(_indices(full)) == 16
    for done in (3, 4, 7):  # stopped after worker 0's, worker 1's and the last-but-one batch
        position = DataProgress()
        for batch in full[:done]:
            position.observe(batch)
        resumed = _epoch(make_loader(dataset, 2, seed=1, num_workers=2, resume=position.state_dict()))
        assert _indices(resumed) == _indices(full[done:]), done
        assert [b["text"] for b in resumed] == [b["text"] for b in full[done:]]


def test_shard_ranks_split_the_shards_and_strict_mode_raises(tmp_path):
    shards(tmp_path)
    dataset = build_dataset({"format": "webdataset", "paths": str(tmp_path / "*.tar"), "shuffle": False}, PRE, train=False)
    seen = [_indices(_epoch(make_loader(dataset, 4, rank=r, world_size=2))) for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 7
    with pytest.raises(DataError, match="3 shards for 4 ranks: every rank needs at least one shard"):
        make_loader(dataset, 4, rank=3, world_size=4)
    strict = build_dataset({"format": "webdataset", "paths": str(tmp_path / "00000.tar"), "strict": True}, PRE, train=False)
    with pytest.raises(DataError, match=r"00000\.tar:000000002: no text"):
        _epoch(make_loader(strict, 4))


def test_truncated_image_in_a_jsonl_set_with_workers(tmp_path):
    write_image(tmp_path / "ok.jpg", 1)
    write_truncated(tmp_path / "cut.jpg")
    rows = "".join(f'{{"image": "{name}", "text": "T {i}"}}\n' for i, name in enumerate(["ok.jpg", "cut.jpg"] * 3))
    (tmp_path / "pairs.jsonl").write_text(rows)
    dataset = build_dataset({"format": "jsonl", "paths": str(tmp_path / "pairs.jsonl"), "shuffle": False}, PRE, train=True)
    progress = DataProgress()
    batches = _epoch(make_loader(dataset, 2, num_workers=2), progress)
    assert [len(b["index"]) for b in batches] == [1, 1, 1] and progress.skipped_count == 3
    assert {s.name for s in progress.skipped} == {str(tmp_path / "cut.jpg")} and "image file is truncated" in progress.skipped[0].reason


def test_jsonl_explicit_pairs_reach_the_batch(tmp_path):
    """text_input / text_output lines (instruction data) arrive as lists beside `text`."""
    write_image(tmp_path / "a.jpg", 1)
    rows = ['{"image": "a.jpg", "text": "Question: q? Short answer: yes", "text_input": "Question: q? Short answer:", "text_output": "yes"}',
            '{"image": "a.jpg", "text": "Caption: a dog", "text_input": "Caption:", "text_output": "a dog"}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    dataset = build_dataset({"format": "jsonl", "paths": str(tmp_path / "pairs.jsonl"), "shuffle": False}, PRE, train=True)
    (batch,) = list(make_loader(dataset, 2))
    assert batch["text_input"] == ["Question: q? Short answer:", "Caption:"] and batch["text_output"] == ["yes", "a dog"]
