"""The frozen-feature cache on a tiny assembly: rows equal the encoder's eval outputs, the feature
dataset yields the image dataset's items, objectives give equal losses either way, stale or damaged
caches are refused with what differs, interrupted builds resume, and the CLI's exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge.assemblies.assembly import load_assembly
from vlbridge.cli.main import main as cli
from vlbridge.data.build import make_loader, read_records
from vlbridge.data.config import DataConfig
from vlbridge.data.datasets import RecordDataset
from vlbridge.data.records import DataError, Skipped
from vlbridge.data.transforms import eval_transform
from vlbridge.errors import DataWarning
from vlbridge.parts.images import load_image
from vlbridge.train.cache import IMAGE_READING, CacheError, CacheWarning, build_encoder, read_manifest, verify_cache, weights_sha256
from vlbridge.train.cache_dataset import feature_dataset
from vlbridge.train.cache_build import BuildSettings, build_cache, fingerprint
from vlbridge.train.cache_dataset import FeatureStore
from vlbridge.train.objectives import Stage1Objective, Stage2Objective

from tests.test_data_samples import image_bytes, write_image, write_jsonl, write_tar, write_truncated

PRESET = "tiny-qformer-opt"
FP32 = BuildSettings(batch_size=3, dtype="fp32", shard_size=4, num_workers=0)
CAPTIONS = ["a red cat on a mat", "a dog in the park", "two birds on a wire", "a cat asleep", "a boat at sea",
            "a tree in winter", "a dog chasing a ball", "a cat on a red mat again"]
IMAGE_OF = [0, 1, 2, 3, 4, 5, 1, 0]  # captions 6 and 7 share images 1 and 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 images (one per id) with 8 captions, and a 9th caption on a truncated image."""
    root = tmp_path_factory.mktemp("cache-data")
    for i in range(6):
        write_image(root / "images" / f"{i}.jpg", seed=i)
    write_truncated(root / "images" / "broken.jpg")
    rows = [{"image": f"images/{i}.jpg", "text": text, "image_id": i} for i, text in zip(IMAGE_OF, CAPTIONS)]
    write_jsonl(root / "train.jsonl", rows + [{"image": "images/broken.jpg", "text": "lost", "image_id": 99}])
    (root / "data.yaml").write_text(f"format: jsonl\npaths: [{root / 'train.jsonl'}]\nnum_workers: 0\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cache(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "features"
    build_cache(PRESET, [data / "data.yaml"], out, FP32)
    return out


@pytest.fixture(scope="module")
def stage1() -> Any:
    return vlbridge.build(PRESET, stage=1)


def data_config(data: Path) -> DataConfig:
    return DataConfig(format="jsonl", paths=[str(data / "train.jsonl")], num_workers=0)


def eval_pixels(model: Any, path: Path) -> torch.Tensor:
    return eval_transform(model.plan.preprocess)(load_image(path))


def test_cache_rows_are_the_encoders_eval_outputs_with_their_ids(data: Path, cache: Path, stage1: Any):
    manifest = read_manifest(cache)
    assert manifest.rows == 6 and [s.rows for s in manifest.shards] == [4, 2] and manifest.dtype == "fp32"
    assert [s.image_id for s in manifest.skipped] == [99] and "broken.jpg" in manifest.skipped[0].name
    encoder = manifest.encoder
    assert (encoder.name, encoder.options["variant"], encoder.num_tokens, encoder.width) == ("eva-vit-g", "tiny", 17, 64)
    assert encoder.preprocess.image_size == 56 and encoder.preprocess.transform == "eval"
    assert encoder.weights_sha256 == weights_sha256(stage1.encoder)
    store = FeatureStore(cache)
    pixels = torch.stack([eval_pixels(stage1, data / "images" / f"{i}.jpg") for i in range(6)])
    expected = stage1.encode_images(pixels)
    for i in range(6):
        shard, row, name = store.rows[i]
        assert name == f"images/{i}.jpg"
        torch.testing.assert_close(store.row(shard, row), expected[i], rtol=1e-5, atol=1e-5)


def test_fp16_cache_is_half_the_size_and_close(data: Path, cache: Path, tmp_path: Path):
    half = build_cache(PRESET, [data_config(data)], tmp_path / "fp16", BuildSettings(dtype="fp16", shard_size=4, num_workers=0))
    full = read_manifest(cache)
    assert sum(s.bytes for s in half.shards) < 0.6 * sum(s.bytes for s in full.shards)
    a, b = FeatureStore(tmp_path / "fp16"), FeatureStore(cache)
    assert a.row(0, 1).dtype == torch.float16
    torch.testing.assert_close(a.row(0, 1).float(), b.row(0, 1), rtol=2e-3, atol=2e-3)


def test_feature_dataset_yields_the_image_datasets_items(data: Path, cache: Path, stage1: Any):
    config = data_config(data)
    features = feature_dataset(config, cache, train=True, assembly=stage1.assembly, encoder=stage1.encoder)
    images = RecordDataset(read_records(config, train=True), eval_transform(stage1.plan.preprocess))
    assert len(features) == len(images) == 9 and features.shuffle
    for i in range(8):
        cached, decoded = features[i], images[i]
        assert set(cached) - {"image_embeds"} == set(decoded) - {"pixel_values"}
        assert all(cached[k] == decoded[k] for k in ("text", "image_id", "image_index", "index", "image_captions"))
        assert cached["text"] in cached["image_captions"]
        assert cached["image_embeds"].shape == (17, 64)
    assert isinstance(features[8], Skipped) and isinstance(images[8], Skipped)
    batch = next(iter(make_loader(features, 9)))
    assert batch["image_embeds"].shape == (8, 17, 64) and "pixel_values" not in batch and len(batch["skipped"]) == 1


def first_batches(model: Any, data: Path, cache: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same 8 samples (the broken one is skipped) from images and from the cache."""
    config = data_config(data)
    images = RecordDataset(read_records(config, train=True), eval_transform(model.plan.preprocess))
    features = feature_dataset(config, cache, train=False)
    return next(iter(make_loader(images, 9))), next(iter(make_loader(features, 9)))


@pytest.mark.parametrize("stage", [1, 2])
def test_objective_losses_equal_with_cache_and_pixels(data: Path, cache: Path, stage1: Any, stage: int):
    model = (stage1 if stage == 1 else vlbridge.build(PRESET, stage=2)).train()
    objective_type = Stage1Objective if stage == 1 else Stage2Objective
    pixels, features = first_batches(model, data, cache)
    assert torch.equal(pixels["image_index"], features["image_index"]) and pixels["text"] == features["text"]
    results = []
    for batch in (pixels, features):
        torch.manual_seed(0)  # the Q-Former's dropout
        results.append(objective_type(generator=torch.Generator().manual_seed(1))(model, batch))
    assert set(results[0]) == set(results[1]) and len(results[0]) == (4 if stage == 1 else 3)  # stage 2: loss, lm, loss_items
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-5)
    model.eval()


def test_stale_cache_is_refused_naming_what_differs(cache: Path):
    manifest = read_manifest(cache)
    bigger = {"name": "bigger", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny", "image_size": 70}},
              "connector": {"use": "qformer", "options": {"variant": "tiny"}}}
    with pytest.raises(CacheError, match=r"(?s)image_size: None in the cache, 70 now.*image_size: 56 in the cache, 70 now.*"
                                         r"vlbridge cache-features --assembly"):
        verify_cache(manifest, load_assembly(bigger), directory=cache)
    assembly = load_assembly(PRESET)
    changed = build_encoder(assembly)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    with pytest.raises(CacheError, match="encoder weights: sha256"):
        verify_cache(manifest, assembly, encoder=changed)
    verify_cache(manifest, assembly, encoder=changed, weights=False)  # options and shapes alone still match
    verify_cache(manifest, assembly)  # the same build: accepted
    with pytest.raises(CacheError, match="holds features of 'eva-vit-g', the assembly uses 'clip-vit-l'"):
        verify_cache(manifest, load_assembly("tiny-mlp-opt"), weights=False)


def test_trainer_seam_verifies_against_the_model(data: Path, cache: Path):
    other = vlbridge.build("tiny-linear-opt", stage=2)
    with pytest.raises(CacheError, match="built for another encoder"):
        feature_dataset(data_config(data), cache, train=True, encoder=other.encoder, assembly=other.assembly)


def damaged_copy(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    return copy


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "features-00001.safetensors").unlink(), "features-00001.safetensors is missing"),
    (lambda d: _truncate(d / "features-00001.safetensors"), "truncated or changed"),
    (lambda d: _scramble_header(d / "features-00000.safetensors"), "it is corrupt"),
    (lambda d: (d / "manifest.json").unlink(), "build was interrupted; rerun the same"),
    (lambda d: (d / "manifest.json").write_text("{not json", encoding="utf-8"), "cannot be read as a manifest"),
])
def test_missing_or_corrupt_files_are_named(cache: Path, tmp_path: Path, damage: Any, message: str):
    copy = damaged_copy(cache, tmp_path)
    damage(copy)
    with pytest.raises(CacheError, match=message):
        FeatureStore(copy)


def test_changed_bytes_are_caught_by_the_checksums(cache: Path, tmp_path: Path):
    copy = damaged_copy(cache, tmp_path)
    shard = copy / "features-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # inside the last row: header and size unchanged
    shard.write_bytes(bytes(raw))
    store = FeatureStore(copy)  # opening checks sizes and headers only
    with pytest.raises(CacheError, match="features-00001.safetensors does not match its sha256"):
        store.verify_checksums()
    FeatureStore(cache).verify_checksums()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _scramble_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"#" * 32  # same size, unreadable JSON header
    path.write_bytes(bytes(raw))


def test_interrupted_build_resumes_and_a_finished_one_needs_overwrite(data: Path, cache: Path, tmp_path: Path):
    copy = damaged_copy(cache, tmp_path)
    (copy / "manifest.json").unlink()
    (copy / "features-00001.safetensors").unlink()
    kept_at = (copy / "features-00000.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    resumed = build_cache(PRESET, [data / "data.yaml"], copy, FP32, log=lines.append)
    assert "kept from the interrupted run" in lines[0] and "kept" not in lines[1]
    assert (copy / "features-00000.safetensors").stat().st_mtime_ns == kept_at
    original = read_manifest(cache)
    assert resumed.shards[0] == original.shards[0]  # recomputed rows may differ in the last bit (MKL), not in ids
    assert resumed.model_copy(update={"shards": []}) == original.model_copy(update={"shards": []})
    assert resumed.shards[1].image_ids == original.shards[1].image_ids
    torch.testing.assert_close(FeatureStore(copy).row(1, 1), FeatureStore(cache).row(1, 1))
    with pytest.raises(CacheError, match="already holds a feature cache .* pass --overwrite"):
        build_cache(PRESET, [data / "data.yaml"], copy, FP32)
    lines.clear()
    rebuilt = build_cache(PRESET, [data / "data.yaml"], copy, FP32, overwrite=True, log=lines.append)
    assert rebuilt.rows == 6 and not any("kept" in line for line in lines)


def test_one_id_for_two_images_and_uncached_images_are_refused(data: Path, cache: Path, tmp_path: Path):
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"image": str(data / "images/0.jpg"), "text": "a", "image_id": 7},
                                                   {"image": str(data / "images/1.jpg"), "text": "b", "image_id": 7}])
    with pytest.raises(DataError, match="image id 7 names two images"):
        build_cache(PRESET, [{"format": "jsonl", "paths": [str(clash)]}], tmp_path / "out", FP32)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"image": str(data / "images/0.jpg"), "text": "new", "image_id": 1234}])
    with pytest.raises(CacheError, match="has no features for image .*id 1234.*repeat --data"):
        feature_dataset({"format": "jsonl", "paths": [str(extra)]}, cache, train=True)


def test_one_file_under_two_ids_is_one_image_from_the_cache_too(data: Path, tmp_path: Path):
    """As when reading images (tests/test_shared_image_files.py): stage 1 must not take the copy for a negative."""
    rows = [{"image": str(data / f"images/{i}.jpg"), "text": text, "image_id": image_id}
            for i, text, image_id in ((0, "a", 7), (1, "b", 8), (0, "c", 9))]
    source = {"format": "jsonl", "paths": [str(write_jsonl(tmp_path / "shared.jsonl", rows))]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # caching encodes each id's image: nothing to say about training yet
        build_cache(PRESET, [source], tmp_path / "out", FP32)
    with pytest.warns(DataWarning, match="1 image id.* is listed under ids 7 and 9"):
        dataset = feature_dataset(source, tmp_path / "out", train=True)
    items = [dataset[i] for i in range(3)]
    assert [item["image_id"] for item in items] == [7, 8, 9] and items[0]["image_index"] == items[2]["image_index"] == 7
    assert items[1]["image_index"] == 8 and items[0]["image_captions"] == items[2]["image_captions"] == ("a", "c")


def test_webdataset_cache_finds_tar_members_by_shard_and_key(tmp_path: Path, stage1: Any):
    """Features are found by shard and key: equal keys in two shards are two images (they shared one
    entry), and a cache of key-only ids is refused as stale."""
    members = [(f"s/{k}.{ext}", data) for k in range(3) for ext, data in (("jpg", image_bytes(k)), ("txt", f"caption {k}".encode()))]
    write_tar(tmp_path / "a" / "shard-0.tar", members + [("s/9.txt", b"no image")])
    write_tar(tmp_path / "b" / "shard-0.tar", [(name, image_bytes(7) if name.endswith(".jpg") else data) for name, data in members])
    both = {"format": "webdataset", "paths": [str(tmp_path / "a" / "shard-0.tar"), str(tmp_path / "b" / "shard-0.tar")]}
    built = build_cache(PRESET, [both], tmp_path / "c", FP32)
    shard_a = str((tmp_path / "a" / "shard-0.tar").resolve())
    assert built.rows == 6 and built.shards[0].image_ids[:3] == [f"{shard_a}:s/{k}" for k in range(3)] and built.shards[0].names[0] == "s/0.jpg"
    dataset = feature_dataset(both, tmp_path / "c", train=False)
    assert [dataset[i]["text"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"] and isinstance(dataset[3], Skipped)
    for i, seed in ((1, 1), (5, 7)):  # a's second image, b's second (the same key)
        expected = stage1.encode_images(stage1.pixel_values([Image.open(io.BytesIO(image_bytes(seed))).convert("RGB")]))[0]
        torch.testing.assert_close(dataset[i]["image_embeds"], expected, rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())  # as an earlier vlbridge wrote it
    del manifest["tar_ids"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="earlier vlbridge that found tar samples by key alone.*Rebuild it: vlbridge cache-features --assembly .*--overwrite"):
        feature_dataset({"format": "webdataset", "paths": [str(tmp_path / "b" / "shard-0.tar")]}, tmp_path / "c", train=False)


def test_a_moved_or_renamed_shard_is_found_by_its_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tar image's id holds its shard's real path, so a cache was refused once its shards moved; it
    records each shard's size and sha256, and finds a shard of the data it does not name by them."""
    from vlbridge.train import cache_tars
    from vlbridge.train.cache import file_sha256

    members = [(f"s/{k}.{ext}", data) for k in range(3) for ext, data in (("jpg", image_bytes(k)), ("txt", f"caption {k}".encode()))]
    write_tar(tmp_path / "a" / "shard-0.tar", members)
    write_tar(tmp_path / "b" / "shard-0.tar", [(name, image_bytes(7) if name.endswith(".jpg") else data) for name, data in members])
    paths = [str(tmp_path / folder / "shard-0.tar") for folder in ("a", "b")]
    built = build_cache(PRESET, [{"format": "webdataset", "paths": paths}], tmp_path / "c", FP32)
    hashed: list[str] = []
    monkeypatch.setattr(cache_tars, "file_sha256", lambda path: (hashed.append(path.name), file_sha256(path))[1])
    before = [item["image_embeds"] for item in feature_dataset({"format": "webdataset", "paths": paths}, tmp_path / "c", train=False)]
    assert hashed == []  # shards where the cache found them are not read again
    shutil.copyfile(paths[0], tmp_path / "copied.tar")  # a new modification time too
    (tmp_path / "a" / "shard-0.tar").unlink()
    (tmp_path / "b" / "shard-0.tar").rename(tmp_path / "b" / "renamed.tar")
    moved = {"format": "webdataset", "paths": [str(tmp_path / "copied.tar"), str(tmp_path / "b" / "renamed.tar")]}
    after = feature_dataset(moved, tmp_path / "c", train=False)
    assert [item["text"] for item in after] == ["caption 0", "caption 1", "caption 2"] * 2 and sorted(hashed) == ["copied.tar", "renamed.tar"]
    assert all(torch.equal(item["image_embeds"], embeds) for item, embeds in zip(after, before))
    assert [(t.shard, t.bytes) for t in built.tar_shards] == [(str(Path(p).resolve()), (tmp_path / "copied.tar").stat().st_size) for p in paths]
    write_tar(tmp_path / "changed.tar", [(name, image_bytes(9) if name.endswith(".jpg") else data) for name, data in members])
    with pytest.raises(CacheError, match=r"has no features for '.*changed.tar:s/0', but has '.*shard-0.tar:s/0'.*by its content; its "
                                         r"content .* is none of the cached shards' either: it changed since\. Rebuild the cache: "
                                         r"vlbridge cache-features --assembly tiny-qformer-opt --format webdataset --paths .* --overwrite"):
        feature_dataset({"format": "webdataset", "paths": [str(tmp_path / "changed.tar")]}, tmp_path / "c", train=False)


def test_a_cache_from_before_shards_were_recorded_is_read_where_they_are_and_refused_where_not(tmp_path: Path):
    members = [(f"s/{k}.{ext}", data) for k in range(2) for ext, data in (("jpg", image_bytes(k)), ("txt", f"caption {k}".encode()))]
    shard = write_tar(tmp_path / "a" / "shard-0.tar", members)
    config = {"format": "webdataset", "paths": [str(shard)]}
    build_cache(PRESET, [config], tmp_path / "c", FP32)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["tar_ids"], _ = "shard:key", manifest.pop("tar_shards", None)  # as the vlbridge before wrote it
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    assert len(feature_dataset(config, tmp_path / "c", train=False)) == 2
    (tmp_path / "a").rename(tmp_path / "moved")
    with pytest.raises(CacheError, match=r"but has '.*a/shard-0.tar:s/0'.*built before vlbridge recorded shards' contents.*"
                                         r"Rebuild the cache: vlbridge cache-features --assembly tiny-qformer-opt .* --overwrite"):
        feature_dataset({"format": "webdataset", "paths": [str(tmp_path / "moved" / "shard-0.tar")]}, tmp_path / "c", train=False)


def _tar_members(keys: list[str], seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for k, key in enumerate(keys) for ext, data in (("jpg", image_bytes(seed + k)), ("txt", f"caption {k}".encode()))]


def test_tar_keys_with_colons_keep_their_names_and_stamps(tmp_path: Path):
    """The cache split a tar image's name at its last ':': key 'x:0' was recorded as '0.jpg' and its
    shard as '<shard>:x', no file, so no stamp: a shard rewritten since went unnoticed."""
    import os

    shard = write_tar(tmp_path / "a.tar", _tar_members(["x:0", "x:1"]))
    config = {"format": "webdataset", "paths": [str(shard)]}
    built = build_cache(PRESET, [config], tmp_path / "c", FP32)
    assert built.shards[0].names == ["x:0.jpg", "x:1.jpg"] and None not in built.shards[0].stamps
    assert built.shards[0].image_ids == [f"{shard.resolve()}:x:0", f"{shard.resolve()}:x:1"] and built.tar_ids == "escaped-shard:key"
    assert [item["text"] for item in feature_dataset(config, tmp_path / "c", train=False)] == ["caption 0", "caption 1"]
    write_tar(shard, _tar_members(["x:0", "x:1"], seed=5))
    os.utime(shard, ns=(1, 1))
    with pytest.raises(CacheError, match=r"2 image file\(s\) changed since"):
        feature_dataset(config, tmp_path / "c", train=False)


def test_a_cache_of_unescaped_tar_ids_is_still_read(tmp_path: Path):
    """Caches before ids escaped the shard hold `pipe:cat ...:KEY` as is; they are read as they are."""
    shard = write_tar(tmp_path / "a.tar", _tar_members(["k0", "k:1"]))
    config = {"format": "webdataset", "paths": [f"pipe:cat {shard}"]}
    build_cache(PRESET, [config], tmp_path / "c", FP32)
    now = [item["image_embeds"] for item in feature_dataset(config, tmp_path / "c", train=False)]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["shards"][0]["image_ids"] == [f"pipe%3Acat {shard}:k0", f"pipe%3Acat {shard}:k:1"]
    manifest["tar_ids"] = "shard:key"  # as the vlbridge before wrote it
    manifest["shards"][0]["image_ids"] = [f"pipe:cat {shard}:k0", f"pipe:cat {shard}:k:1"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    old = feature_dataset(config, tmp_path / "c", train=False)
    assert len(old) == 2 and all(torch.equal(item["image_embeds"], embeds) for item, embeds in zip(old, now))


def test_a_cache_of_images_read_as_stored_warns_and_its_shards_are_recomputed(data: Path, cache: Path, tmp_path: Path):
    """Images are now read upright (EXIF) and with transparency on white: a cache an earlier vlbridge
    built may hold other features for such images, and said nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        feature_dataset(data_config(data), cache, train=True)  # one of this vlbridge's: no warning
    assert read_manifest(cache).image_reading == IMAGE_READING
    copy = tmp_path / "old"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())  # as an earlier vlbridge wrote it
    del manifest["image_reading"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(CacheWarning, match="built by an earlier vlbridge, which read images as stored.*--overwrite"):
        feature_dataset(data_config(data), copy, train=True)
    encoder = read_manifest(copy).encoder  # the stamp an earlier build gave its shards: a resumed build now recomputes them
    earlier = {"encoder": encoder.model_dump(mode="json"), "dtype": FP32.dtype, "shard_size": FP32.shard_size}
    assert fingerprint(encoder, FP32) != hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()


def test_vlbridge_train_says_an_older_cache_warning_as_a_plain_line(data: Path, cache: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    """The CLI printed vlbridge's plan warnings as `vlbridge CMD: warning:` lines, but the cache's as Python
    writes a warning: a source path and line, then `CacheWarning:`."""
    import yaml

    copy = tmp_path / "old"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["image_reading"]  # as an earlier vlbridge wrote it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    config = {"assembly": PRESET, "stage": 1, "batch_size": 4, "steps": 1, "log_every": 1, "tensorboard": False,
              "output_dir": str(tmp_path / "run"), "data": {"train": data_config(data).model_dump(exclude_defaults=True),
                                                           "features": str(copy)}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert cli(["train", str(tmp_path / "train.yaml")]) == 0
    err = capsys.readouterr().err
    assert f"vlbridge train: warning: feature cache {str(copy)!r} was built by an earlier vlbridge" in err
    assert "CacheWarning" not in err


def test_cli_exit_codes(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cli"
    args = ["cache-features", "-a", PRESET, "--format", "jsonl", "--paths", str(data / "train.jsonl"), "--out", str(out),
            "--num-workers", "0", "--dtype", "fp32"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "cached 6 images, 1 unreadable skipped in 1 shards" in printed  # default shard size: one shard
    assert re.search(r"^skipped images/broken.jpg: .*image file '.*broken.jpg'.*truncated", printed, re.M)  # was the count alone
    assert read_manifest(out).rows == 6
    assert cli(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli([*args, "--overwrite", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 6 and [image["name"] for image in summary["skipped_images"]] == ["images/broken.jpg"]
    assert cli(["cache-features", "-a", PRESET, "--format", "jsonl", "--out", str(out)]) == 2
    assert "needs --paths" in capsys.readouterr().err
    assert cli(["cache-features", "-a", PRESET, "--data", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["cache-features", "-a", "no-such-preset", "--data", str(data / "data.yaml"), "--out", str(out)]) == 2
    assert "no assembly file or preset named 'no-such-preset'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli(["cache-features", "-a", PRESET, "--data", str(data / "data.yaml")])  # no --out
    assert exited.value.code == 2


def test_training_from_the_cache_end_to_end(data: Path, cache: Path, tmp_path: Path):
    train = pytest.importorskip("vlbridge.train.trainer", reason="the trainer is not in this checkout")
    config = {"assembly": PRESET, "stage": 1, "batch_size": 4, "steps": 2, "log_every": 1, "tensorboard": False,
              "output_dir": str(tmp_path / "run"), "data": {"train": data_config(data).model_dump(exclude_defaults=True), "features": str(cache)}}
    result = train.run(config)
    assert result.step == 2 and torch.isfinite(torch.tensor(result.train["loss"]))


def test_the_resize_mode_is_part_of_the_encoder_identity():
    """A cache of squashed images is stale for an encoder that centre-crops; old manifests read as squash."""
    from vlbridge.train.cache import EncoderIdentity, PreprocessInfo, identity_problems

    base = {"image_size": 28, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    old = PreprocessInfo.model_validate(base)  # a manifest written before resize_mode existed
    assert (old.resize_mode, old.resize_size) == ("squash", None)

    def identity(preprocess: PreprocessInfo) -> EncoderIdentity:
        return EncoderIdentity(name="e", plugin="p", options={}, num_tokens=4, width=8, preprocess=preprocess, weights_sha256="0")

    cropped = PreprocessInfo(**base, resize_mode="shortest", resize_size=32)
    assert identity_problems(identity(old), identity(cropped)) == [
        "preprocessing resize_mode: squash in the cache, shortest now", "preprocessing resize_size: None in the cache, 32 now"]
    assert identity_problems(identity(old), identity(PreprocessInfo(**base, resize_mode="squash"))) == []


def test_padding_to_a_square_is_part_of_the_encoder_identity():
    """A cache of cropped images is stale for an encoder that pads them to squares first (LLaVA-1.5's
    'pad'); manifests written before encoders could pad read as not padding."""
    from vlbridge.train.cache import EncoderIdentity, PreprocessInfo, identity_problems

    base = {"image_size": 28, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "resize_mode": "shortest"}

    def identity(preprocess: PreprocessInfo) -> EncoderIdentity:
        return EncoderIdentity(name="e", plugin="p", options={}, num_tokens=4, width=8, preprocess=preprocess, weights_sha256="0")

    old = PreprocessInfo.model_validate(base)
    padded = PreprocessInfo.model_validate_json(PreprocessInfo(**base, pad_to_square=(122, 116, 104)).model_dump_json())
    assert identity_problems(identity(old), identity(padded)) == [
        "preprocessing pad_to_square: None in the cache, (122, 116, 104) now"]


def _missing_encoder_weights(tmp_path: Path) -> dict[str, Any]:
    """tiny-qformer-opt with its encoder pointed at weights that do not exist."""
    return {"name": "missing-encoder", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny", "pretrained": str(tmp_path / "no-vit")}},
            "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8}}}


def test_build_cache_from_python_checks_the_encoders_weights_before_building_it(data: Path, tmp_path: Path, monkeypatch):
    """Issue 18: build_cache built the encoder directly, so the reachability check of vlbridge.build was skipped."""
    from vlbridge.assemblies import reachability

    with pytest.raises(reachability.UnreachableWeightsError, match=r"encoder eva-vit-g \(weights\): encoder.options.pretrained .*no-vit"):
        build_cache(_missing_encoder_weights(tmp_path), [data / "data.yaml"], tmp_path / "out", FP32)
    assert not (tmp_path / "out").exists()  # refused before the output directory is made
    calls = []
    counted = reachability.reachability_problems
    monkeypatch.setattr(reachability, "reachability_problems", lambda *a, **k: calls.append(k) or counted(*a, **k))
    build_cache(PRESET, [data / "data.yaml"], tmp_path / "python", FP32)
    assert cli(["cache-features", "-a", PRESET, "--data", str(data / "data.yaml"), "--out", str(tmp_path / "cli"),
                "--num-workers", "0", "--random-weights", "--json"]) == 0
    assert [call["random_weights"] for call in calls] == [False, True]  # once per build, the CLI's flag passed on


def test_an_image_replaced_after_caching_is_refused(data: Path, tmp_path: Path):
    """Same file name and id, another picture: the cache's features are of the old one (a regenerated
    dataset trained silently against them)."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    config = {"format": "jsonl", "paths": [str(copy / "train.jsonl")], "image_root": str(copy), "num_workers": 0}
    rows = [{"image": str(copy / "images" / f"{i}.jpg"), "text": "x", "image_id": i} for i in range(6)]
    write_jsonl(copy / "train.jsonl", rows)
    built = build_cache(PRESET, [config], tmp_path / "features", FP32)
    assert all(stamp is not None for shard in built.shards for stamp in shard.stamps)
    assert len(feature_dataset(config, tmp_path / "features", train=True)) == 6
    write_image(copy / "images" / "3.jpg", seed=42)  # a new picture under the old name
    with pytest.raises(CacheError, match=r"1 image file\(s\) changed since their features were computed .*3.jpg.*--overwrite"):
        feature_dataset(config, tmp_path / "features", train=True)


def test_one_id_in_two_places_is_refused_and_a_replaced_shard_is_noticed(tmp_path: Path):
    """The same relative path under two folders (the path is the id) was one image's features; a shard
    rewritten after caching trained on the old pictures. (Equal tar keys of two shards: see above.)"""
    import os

    members = [(f"s/{k}.{ext}", data) for k in range(2) for ext, data in (("jpg", image_bytes(k)), ("txt", f"caption {k}".encode()))]
    write_tar(tmp_path / "a.tar", members)
    write_tar(tmp_path / "b.tar", [(f"s/{k}.{ext}", data) for k in range(2) for ext, data in (("jpg", image_bytes(k + 5)), ("txt", b"x"))])
    for folder in ("w0", "w1"):
        write_image(tmp_path / folder / "images" / "0.jpg", seed=len(folder) + (folder == "w1"))
        write_jsonl(tmp_path / folder / "t.jsonl", [{"image": "images/0.jpg", "text": "x"}])
    with pytest.raises(DataError, match="image id 'images/0.jpg' names two images"):
        build_cache(PRESET, [{"format": "jsonl", "paths": [str(tmp_path / f / "t.jsonl")]} for f in ("w0", "w1")], tmp_path / "w", FP32)
    shard = {"format": "webdataset", "paths": [str(tmp_path / "a.tar")]}
    built = build_cache(PRESET, [shard], tmp_path / "c", FP32)
    assert all(stamp is not None for stamp in built.shards[0].stamps)
    assert len(feature_dataset(shard, tmp_path / "c", train=False)) == 2
    write_tar(tmp_path / "a.tar", [(name, image_bytes(9) if name.endswith(".jpg") else data) for name, data in members])
    os.utime(tmp_path / "a.tar", ns=(1, 1))  # another time, whatever the clock's resolution
    with pytest.raises(CacheError, match="changed since their features were computed"):
        feature_dataset(shard, tmp_path / "c", train=False)


def test_compare_recaches_images_that_changed(tmp_path: Path):
    """compare's cache folder is keyed by the annotation files: a replaced image made every rerun
    refuse the stale cache, with advice that did not apply to compare. It now caches them again."""
    from vlbridge.compare.config import CompareConfig
    from vlbridge.compare.runner import changed_images, feature_cache

    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.jpg", seed=i)
    write_jsonl(tmp_path / "t.jsonl", [{"image": f"images/{i}.jpg", "text": "x", "image_id": i} for i in range(3)])
    data = {"format": "jsonl", "paths": [str(tmp_path / "t.jsonl")], "num_workers": 0}
    config = CompareConfig(runs=[{"name": "a", "assembly": PRESET, "stage2_steps": 1}], stage2_data=data, output_dir=str(tmp_path / "out"),
                           evals=[{"name": "val", "captions": str(tmp_path / "t.jsonl"), "tasks": ["caption"]}])
    assembly = vlbridge.load_assembly(PRESET).config.model_dump(mode="json")
    said: list[str] = []
    folder = Path(feature_cache(config, assembly, said.append))
    assert changed_images(config, folder) == [] and len(said) == 1
    write_image(tmp_path / "images" / "1.jpg", seed=77)
    assert feature_cache(config, assembly, said.append) == str(folder)
    assert "1 training image(s) changed since" in said[-1] and changed_images(config, folder) == []


def test_an_image_unreadable_when_cached_that_is_readable_now_is_refused(tmp_path: Path):
    """An image skipped at build time (truncated, or not there yet) and fixed since was skipped by
    training from the cache, while training from the images used it: no stamp was kept for it."""
    write_image(tmp_path / "images" / "0.jpg", seed=0)
    write_truncated(tmp_path / "images" / "1.jpg")
    write_jsonl(tmp_path / "t.jsonl", [{"image": f"images/{i}.jpg", "text": "x", "image_id": i} for i in range(3)])  # 2.jpg: none
    config = {"format": "jsonl", "paths": [str(tmp_path / "t.jsonl")], "num_workers": 0}
    built = build_cache(PRESET, [config], tmp_path / "features", FP32)
    assert [s.image_id for s in built.skipped] == [1, 2]
    assert len(feature_dataset(config, tmp_path / "features", train=True)) == 3  # unchanged: still skipped, no error
    write_image(tmp_path / "images" / "2.jpg", seed=2)  # appeared
    with pytest.raises(CacheError, match=r"1 image file\(s\) changed since .*2.jpg.*--overwrite"):
        feature_dataset(config, tmp_path / "features", train=True)
    (tmp_path / "images" / "2.jpg").unlink()
    write_image(tmp_path / "images" / "1.jpg", seed=1)  # fixed
    with pytest.raises(CacheError, match=r"1 image file\(s\) changed since .*1.jpg"):
        feature_dataset(config, tmp_path / "features", train=True)


def test_the_same_build_writes_the_same_bytes_and_a_resumed_one_too(data: Path, tmp_path: Path):
    """Shard headers held several metadata keys, which safetensors writes in a random order: two builds
    of the same data (or a resumed and an uninterrupted one) differed in bytes and manifest sha256s."""
    first = build_cache(PRESET, [data / "data.yaml"], tmp_path / "a", FP32)
    second = build_cache(PRESET, [data / "data.yaml"], tmp_path / "b", FP32)
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    (tmp_path / "a" / "manifest.json").unlink()
    (tmp_path / "a" / first.shards[-1].file).unlink()  # killed while writing the last shard
    resumed = build_cache(PRESET, [data / "data.yaml"], tmp_path / "a", FP32)
    assert resumed.model_dump(exclude={"sources"}) == second.model_dump(exclude={"sources"})
    for name in ["manifest.json", *(s.file for s in second.shards)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
