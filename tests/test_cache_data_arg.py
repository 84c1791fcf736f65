"""`vlbridge cache-features --data` given a training config (the file a user has at hand) names the
mix-up and its fix, instead of one 'unknown key' line for each of the training config's settings; a
compare config likewise."""

from __future__ import annotations

import pytest
import yaml

from vlbridge.cli.main import main


def _training_config(tmp_path) -> str:
    training = {"assembly": "tiny-qformer-opt", "stage": 1, "batch_size": 2, "steps": 1, "output_dir": str(tmp_path / "run"),
                "data": {"train": {"format": "jsonl", "paths": ["train.jsonl"]}, "eval": {"format": "jsonl", "paths": ["val.jsonl"]}}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(training), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(("kind", "sections"), [
    ("training", "save data.train and data.eval as a file of its own each and give one --data per file"),
    # the compare example printed 19 lines, one per compare setting ('name: unknown key', 'runs: unknown key', ...)
    ("compare", "save stage1_data and stage2_data as a file of its own each"),
])
def test_another_config_as_data_config_is_named(tmp_path, capsys, repo, kind, sections):
    path = _training_config(tmp_path) if kind == "training" else str(repo / "examples" / "compare-world.yaml")
    code = main(["cache-features", "-a", "tiny-qformer-opt", "--data", path, "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"data config {path!r} is a {kind} config; --data takes one dataset's settings" in err
    assert sections in err and "unknown key" not in err
    assert not (tmp_path / "cache").exists()
