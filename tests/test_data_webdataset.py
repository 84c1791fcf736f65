"""Tar shards read through webdataset: pipe: URLs, brace expansion, rank/worker splitting, resampling, resume."""

from __future__ import annotations

import gzip
import os
import tarfile
from itertools import islice

import pytest

torch = pytest.importorskip("torch")

from tests.test_data_samples import image_bytes, sample_members, shards, write_image, write_jsonl, write_tar  # noqa: E402
from vlbridge.data import (DataConfigError, DataError, DataProgress, ImageText, Skipped, build_dataset, expand_shards, flatten_groups,  # noqa: E402
                           group_captions, iter_shard, load_data_config, make_loader)
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess  # noqa: E402

PRE = Preprocess(16, CLIP_MEAN, CLIP_STD, "bicubic")


def _texts(batches) -> list[str]:
    return [t for batch in batches for t in batch["text"]]


def _uniform_shards(root, count: int = 4, per_shard: int = 3) -> None:
    for s in range(count):
        write_tar(root / f"{s:05d}.tar", [m for i in range(per_shard) for m in sample_members(f"{s}{i:04d}", 10 * s + i, f"s{s} i{i}")])


def test_pipe_urls_are_brace_expanded_and_a_corrupt_sample_is_counted_and_skipped(tmp_path):
    shards(tmp_path)  # 7 good samples, one without text, one with a corrupt jpg
    spec = f"pipe:cat {tmp_path}/{{00000..00002}}.tar"
    assert expand_shards(spec) == [f"pipe:cat {tmp_path}/{n:05d}.tar" for n in range(3)]
    dataset = build_dataset({"format": "webdataset", "paths": spec, "shuffle": False}, PRE, train=True)
    progress = DataProgress()
    for batch in make_loader(dataset, 3, num_workers=2):
        progress.observe(batch)
    local = build_dataset({"format": "webdataset", "paths": str(tmp_path / "*.tar"), "shuffle": False}, PRE, train=True)
    assert progress.skip_counts == {"no text": 1, "unreadable image": 1} and progress.samples == 9
    assert sorted(_texts(make_loader(dataset, 3))) == sorted(_texts(make_loader(local, 3))) and len(_texts(make_loader(local, 3))) == 7


def test_a_failing_pipe_is_a_counted_unreadable_shard_not_a_crash(tmp_path):
    *_, last = list(iter_shard(f"pipe:cat {tmp_path}/missing.tar"))
    assert isinstance(last, Skipped) and last.kind == "unreadable tar" and "stopped after 0 members" in last.reason


def test_ranks_and_workers_see_disjoint_samples_that_cover_the_set(tmp_path):
    _uniform_shards(tmp_path)
    dataset = build_dataset({"format": "webdataset", "paths": f"pipe:cat {tmp_path}/{{00000..00003}}.tar"}, PRE, train=True)
    seen = [_texts(make_loader(dataset, 2, seed=3, rank=r, world_size=2, num_workers=2)) for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 6
    assert sorted(seen[0] + seen[1]) == sorted(f"s{s} i{i}" for s in range(4) for i in range(3))


def test_resampled_stream_is_endless_seeded_and_resumes_exactly(tmp_path):
    _uniform_shards(tmp_path, count=3)
    dataset = build_dataset({"format": "webdataset", "paths": str(tmp_path / "{00000..00002}.tar"), "resample": True, "shuffle_buffer": 4}, PRE, train=True)
    full = list(islice(make_loader(dataset, 2, seed=7, rank=1, world_size=4), 12))  # 24 samples from 9: shards repeat
    assert len(_texts(full)) == 24 and len(set(_texts(full))) < 24
    assert _texts(islice(make_loader(dataset, 2, seed=7, rank=1, world_size=4), 12)) == _texts(full)
    assert _texts(islice(make_loader(dataset, 2, seed=8, rank=1, world_size=4), 12)) != _texts(full)
    assert _texts(islice(make_loader(dataset, 2, seed=7, rank=2, world_size=4), 12)) != _texts(full)
    position = DataProgress()
    for batch in full[:5]:
        position.observe(batch)
    resumed = make_loader(dataset, 2, seed=7, rank=1, world_size=4, resume=position.state_dict())
    assert _texts(islice(resumed, 7)) == _texts(full[5:])


def test_resample_is_for_training_webdataset_only(tmp_path):
    _uniform_shards(tmp_path, count=1)
    with pytest.raises(DataError, match=r"data\.eval\.resample: a resampled stream never ends"):
        build_dataset({"format": "webdataset", "paths": str(tmp_path / "00000.tar"), "resample": True}, PRE, train=False, where="data.eval")
    with pytest.raises(DataConfigError, match="resample: only used by format 'webdataset', not 'jsonl'"):
        load_data_config({"format": "jsonl", "paths": "x.jsonl", "resample": True})


def test_a_file_that_is_not_a_tar_is_refused_by_name(tmp_path):
    """A JSON file named as a shard trained nothing and was reported as 'lower batch_size'."""
    from vlbridge.data.records import DataError
    from vlbridge.data.shards import expand_shards

    (tmp_path / "captions.json").write_text('{"a": 1}\n')
    shards(tmp_path)
    good = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert expand_shards(good) == good
    with pytest.raises(DataError, match=r"1 shard file is not a tar archive: '.*captions.json'; webdataset shards are .tar files"):
        expand_shards([*good, str(tmp_path / "captions.json")])
    with pytest.raises(DataError, match=r"is a folder; give its shards, e.g. the glob '.*\*.tar'"):
        expand_shards([str(tmp_path)])


# -- keys, repeated members, shard identity, damaged and compressed shards ------------------------
def _read(url: str) -> list[str]:
    """What iter_shard made of each sample: its text, or its skip kind."""
    return [x.text if isinstance(x, ImageText) else x.kind for x in iter_shard(url)]


def _webdataset_keys(path) -> list[str]:
    """The keys webdataset itself groups a shard's members under (its default pipeline)."""
    from webdataset.tariterators import tarfile_samples

    return [sample["__key__"] for sample in tarfile_samples([{"url": str(path)}])]


def test_keys_end_at_the_first_dot_after_the_last_slash_as_webdataset_groups_them(tmp_path):
    """`a.b.jpg` was a sample without image ('fields' b.jpg, b.txt); two dotted keys that webdataset
    groups as one sample were one silent 'no image' for two."""
    members = (sample_members("a.b", 0, "lone dotted key") + sample_members("dir.v1/c", 1, "dot in a folder")
               + sample_members("x.1", 2, "first of x") + sample_members("x.2", 3, "second of x") + sample_members("p/q/r", 4, "folders"))
    path = write_tar(tmp_path / "dots.tar", members + [(".hidden.jpg", image_bytes(5)), ("README", b"notes")])
    out = list(iter_shard(str(path)))
    read = [x for x in out if isinstance(x, ImageText)]
    assert [x.image_id.rpartition(":")[2] for x in read] == ["a", "dir.v1/c", "p/q/r"] == [k for k in _webdataset_keys(path) if k != "x"]
    assert [x.text for x in read] == ["lone dotted key", "dot in a folder", "folders"] and read[0].image.name == f"{path}:a.b.jpg"
    (merged,) = [x for x in out if isinstance(x, Skipped) and x.name.endswith(":x")]
    assert merged.kind == "no image" and "2 images (1.jpg, 2.jpg)" in merged.reason and "write keys without dots" in merged.reason
    unkeyed = sorted(x.name.rpartition(":")[2] for x in out if isinstance(x, Skipped) and "has no key" in x.reason)
    assert unkeyed == [".hidden.jpg", "README"] and len(out) == 6


def test_a_member_repeated_in_a_sample_skips_that_sample_not_the_rest_of_the_shard(tmp_path):
    members = sample_members("k1", 0, "one") + [("k1.TXT", b"again")] + sample_members("k2", 1, "two") + sample_members("k3", 2, "three")
    path = write_tar(tmp_path / "dup.tar", members)
    with pytest.raises(ValueError, match="duplicate file name"):  # webdataset's own reader refuses the sample
        _webdataset_keys(path)
    first, *rest = iter_shard(str(path))
    assert first.kind == "repeated member" and first.name == f"{path}:k1"
    assert all(part in first.reason for part in (repr(str(path)), "key 'k1'", "member 'k1.TXT' appears twice"))
    assert [x.text for x in rest] == ["two", "three"]


def test_equal_keys_in_two_shards_are_two_images(tmp_path):
    """Two img2dataset outputs both start at 000000000: their images shared one image index, so
    stage 1 took each for the other's positive."""
    for out, seed in (("laion", 0), ("cc3m", 5)):
        write_tar(tmp_path / out / "00000.tar", sample_members("000000000", seed, f"{out} first") + sample_members("000000001", seed + 1, f"{out} second"))
    dataset = build_dataset({"format": "webdataset", "paths": f"{tmp_path}/{{laion,cc3m}}/00000.tar", "shuffle": False}, PRE, train=True)
    indices = {text: int(index) for batch in make_loader(dataset, 4) for text, index in zip(batch["text"], batch["image_index"])}
    assert len(indices) == 4 and len(set(indices.values())) == 4
    relative = list(iter_shard(os.path.relpath(tmp_path / "laion" / "00000.tar")))[0]
    assert relative.image_id == f"{tmp_path.resolve()}/laion/00000.tar:000000000"  # however the path is written


def test_a_shard_is_resolved_to_its_real_path_once_not_per_sample(tmp_path, monkeypatch):
    """Every sample's id holds its shard's real path; resolving it costs a stat of each folder above
    the shard (slow on a network file system), so a shard is resolved once."""
    import vlbridge.data.shards as shards_module

    path = write_tar(tmp_path / "00000.tar", [m for i in range(5) for m in sample_members(f"{i:09d}", i, f"caption {i}")])
    calls = []
    resolve = shards_module.shard_identity
    monkeypatch.setattr(shards_module, "shard_identity", lambda url: (calls.append(url), resolve(url))[1])
    samples = list(iter_shard(str(path)))
    assert [s.image_id for s in samples] == [f"{path.resolve()}:{i:09d}" for i in range(5)]
    assert calls == [str(path)]


def test_compressed_piped_and_empty_shards_and_cuts_inside_a_member(tmp_path):
    members = sample_members("a/b/c", 0, "one") + sample_members("a/b/d", 1, "two")
    plain = write_tar(tmp_path / "s.tar", members)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert _read(str(tmp_path / "s.tar.gz")) == _read(f"pipe:cat {tmp_path}/s.tar.gz") == _read(str(plain)) == ["one", "two"]
    assert expand_shards(f"{tmp_path}/s.tar{{,.gz}}") == [str(plain), str(tmp_path / "s.tar.gz")]
    assert list(iter_shard(str(write_tar(tmp_path / "empty.tar", [])))) == []  # no samples, nothing damaged
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 shard file is not a tar archive: '.*zero.tar'"):
        expand_shards(str(tmp_path / "zero.tar"))
    with tarfile.open(plain) as tar:
        cut = next(m.offset_data for m in tar if m.name == "a/b/d.jpg") + 100  # inside the second image
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(plain.read_bytes()[:cut]))
    for url in (str(tmp_path / "cut.tar.gz"), f"pipe:cat {tmp_path}/cut.tar.gz", f"pipe:gzip -dc {tmp_path}/cut.tar.gz"):
        *out, last = iter_shard(url)
        assert [x.text for x in out] == ["one"] and last.kind == "unreadable tar" and last.name == url, url


# -- several captions per image ---------------------------------------------------------------------
def _item_groups(items) -> list[tuple[str, tuple[str, ...], int]]:
    """(text, image_captions, which image) per item, images numbered by first appearance."""
    order: dict[int, int] = {}
    return [(item["text"], tuple(item["image_captions"]), order.setdefault(int(item["image_index"]), len(order))) for item in items]


def test_every_text_member_is_a_caption_of_the_image_as_in_json(tmp_path):
    """`k.en.txt` + `k.de.txt` was one skipped 'no text' sample, and `k.txt` + `k.alt.txt` trained on
    k.txt alone: each text member is now a caption of the image, in name order (txt first), one pair
    each under one image id, as a JSONL file with several captions of an image gives them."""
    captions = {"k1": {"en.txt": "a dog", "de.txt": "ein Hund"}, "k2": {"alt.txt": "alt text", "txt": "main caption"},
                "k3": {"txt": " ", "0.txt": "zero", "1.txt": "one", "2.txt": ""}}
    members = [(f"{key}.{field}", text.encode()) for key, fields in captions.items() for field, text in fields.items()]
    members += [(f"{key}.jpg", image_bytes(i)) for i, key in enumerate(captions)]
    members += sample_members("k4", 4, "", meta={"caption": "from json"}) + [("k4.en.txt", b"  ")]
    members += [("k5.jpg", image_bytes(5)), ("k5.en.txt", b""), ("k5.de.txt", b"\n")]
    members += sample_members("k6", 6, "a cat", meta={"text_input": "What is it?", "text_output": "a cat"}) + [("k6.de.txt", b"eine Katze")]
    path = write_tar(tmp_path / "multi.tar", sorted(members, key=lambda member: member[0].split(".")[0]))  # a key's members together
    out = list(iter_shard(str(path)))
    pairs = [x for x in out if isinstance(x, ImageText)]
    assert [x.text for x in pairs] == ["ein Hund", "a dog", "main caption", "alt text", "zero", "one", "from json", "a cat"]
    assert [x.image_id.rpartition(":")[2] for x in pairs] == ["k1", "k1", "k2", "k2", "k3", "k3", "k4", "k6"]
    assert pairs[0].image.data is pairs[1].image.data and pairs[0].image_captions == ("ein Hund", "a dog")
    (blank,) = [x for x in out if isinstance(x, Skipped)]
    assert blank.kind == "no text" and "2 .txt members (de.txt, en.txt), all of them blank" in blank.reason
    assert pairs[-1].extra["text_output"] == "a cat"  # an instruction pair is one pair, not one per caption
    retrieval = flatten_groups(group_captions(pairs))  # what evaluation and retrieval make of the pairs, as of JSON's
    assert retrieval.img2txt == [[0, 1], [2, 3], [4, 5], [6], [7]] and retrieval.txt2img == [0, 0, 1, 1, 2, 2, 3, 4]
    in_order = {"k1": ["ein Hund", "a dog"], "k2": ["main caption", "alt text"], "k3": ["zero", "one"]}
    for i, key in enumerate(in_order):
        write_image(tmp_path / "images" / f"{key}.jpg", seed=i)
    rows = [{"image": f"images/{key}.jpg", "text": text, "image_id": key} for key, texts in in_order.items() for text in texts]
    jsonl = build_dataset({"format": "jsonl", "paths": str(write_jsonl(tmp_path / "t.jsonl", rows))}, PRE, train=True)
    tar = build_dataset({"format": "webdataset", "paths": str(path), "shuffle": False}, PRE, train=True)
    from_tar = [item for item in tar if not isinstance(item, Skipped)][:6]
    assert _item_groups(from_tar) == _item_groups(jsonl[i] for i in range(len(jsonl)))
    assert _item_groups(from_tar)[:2] == [("ein hund", ("ein hund", "a dog"), 0), ("a dog", ("ein hund", "a dog"), 0)]


def test_image_ids_are_unambiguous_whatever_colons_the_key_or_shard_holds(tmp_path):
    """The id was `SHARD:KEY` as is: key 'a:b' of shard 'p.tar' and key 'b' of shard 'p.tar:a' were one
    image, and readers that split the id (or the image's name) at a ':' took part of the key for the shard."""
    from vlbridge.data.shards import split_tar_image_id

    folder = tmp_path / "100%:data"
    first = write_tar(folder / "p.tar", sample_members("a:b", 0, "colon key") + sample_members("s3:x/y:z", 1, "colons and a folder"))
    second = write_tar(folder / "p.tar:a", sample_members("b", 2, "colon shard"))
    piped = f"pipe:cat '{first}'"
    samples = [x for url in (str(first), str(second), piped) for x in iter_shard(url)]
    assert len({x.image_id for x in samples}) == 5
    assert [split_tar_image_id(x.image_id) for x in samples] == [
        (str(first.resolve()), "a:b"), (str(first.resolve()), "s3:x/y:z"), (str(second.resolve()), "b"), (piped, "a:b"), (piped, "s3:x/y:z")]
    assert samples[0].image_id == f"{str(first.resolve()).replace('%', '%25').replace(':', '%3A')}:a:b"
    assert [x.image.tar_member for x in samples[:3]] == [(str(first), "a:b.jpg"), (str(first), "s3:x/y:z.jpg"), (str(second), "b.jpg")]
    assert samples[3].image.name == f"{piped}:a:b.jpg"


def test_a_caption_that_is_not_utf8_is_skipped_and_counted_not_read_as_mojibake(tmp_path):
    members = sample_members("a", 0, "a red square")
    members += [(name, b"caf\xe9 au lait" if name.endswith(".txt") else data) for name, data in sample_members("b", 1, "x")]
    shard = write_tar(tmp_path / "latin1.tar", members)
    first, second = iter_shard(str(shard))
    assert isinstance(first, ImageText) and first.text == "a red square"
    assert isinstance(second, Skipped) and second.kind == "unreadable text" and second.name.endswith("latin1.tar:b")
    assert "its .txt member is not UTF-8 text (byte 0xe9 at offset 3)" in second.reason


def test_a_caption_member_that_is_not_utf8_is_left_out_and_counted_not_its_sample(tmp_path):
    """`k.txt` good + `k.alt.txt` in Latin-1 skipped the whole sample, good caption and all."""
    members = sample_members("k", 0, "a red square") + [("k.alt.txt", b"caf\xe9 au lait")]
    members += sample_members("n", 1, " ") + [("n.alt.txt", b"\xff")]  # no readable caption at all: skipped as before
    members += sample_members("j", 2, None, meta={"caption": "from json"}) + [("j.txt", b"\xe9")]  # the .json's, as without a .txt
    shard = write_tar(tmp_path / "mixed.tar", members)
    pair, left_out, none, from_json, _ = iter_shard(str(shard))
    assert isinstance(from_json, ImageText) and from_json.text == "from json"
    assert isinstance(pair, ImageText) and pair.text == "a red square" and pair.image_captions == ("a red square",)
    assert isinstance(left_out, Skipped) and left_out.kind == "unreadable text" and left_out.name.endswith("mixed.tar:k.alt.txt")
    assert "its .alt.txt member is not UTF-8 text (byte 0xe9 at offset 3); left out, the sample is read without it" in left_out.reason
    assert isinstance(none, Skipped) and none.kind == "unreadable text" and none.name.endswith("mixed.tar:n")
    assert "its .alt.txt member is not UTF-8 text (byte 0xff at offset 0); write captions as UTF-8" in none.reason
    progress = DataProgress()
    batches = list(make_loader(build_dataset({"format": "webdataset", "paths": str(shard), "shuffle": False}, PRE, train=True), 8))
    for batch in batches:
        progress.observe(batch)
    assert _texts(batches) == ["a red square", "from json"] and progress.skip_counts == {"unreadable text": 3}


def test_a_sample_without_text_says_what_its_txt_and_json_hold(tmp_path):
    """An empty .txt read as "1 .txt members (txt), none of them the caption", and a 'caption' that is a
    number as "neither a non-empty .txt member nor a 'caption' in .json"."""
    image = image_bytes(0)
    shard = write_tar(tmp_path / "s.tar", [("a.jpg", image), ("a.txt", b""), ("b.jpg", image), ("b.json", b'{"caption": 5}'),
                                           ("c.jpg", image), ("c.json", b'{"url": "x"}'), ("d.jpg", image), ("d.txt", b" \n")])
    reasons = [sample.reason for sample in iter_shard(str(shard))]
    assert reasons == ["no text (its .txt member is empty, and no .json)",
                       "no text (no .txt member, and its .json 'caption' is int 5, not text)",
                       "no text (no .txt member, and no 'caption' in its .json)",
                       "no text (its .txt member is blank, and no .json)"]  # was 'is empty': it holds spaces
