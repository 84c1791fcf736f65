"""Tar shards read through webdataset: pipe: URLs, brace expansion, rank/worker splitting, resampling, resume."""

from __future__ import annotations

from itertools import islice

import pytest

torch = pytest.importorskip("torch")

from tests.test_data_samples import sample_members, shards, write_tar  # noqa: E402
from vlbridge.data import DataConfigError, DataError, DataProgress, Skipped, build_dataset, expand_shards, iter_shard, load_data_config, make_loader  # noqa: E402
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
