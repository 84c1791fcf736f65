"""Seeds and counts past what the run can use: a seed beyond torch's 64 bits (torch.manual_seed
overflowed: an internal error after the model was built) and a query count given twice to the demo
(two runs of one name: pydantic's traceback) are usage errors, said before anything runs."""

from __future__ import annotations

import pytest

from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.files.config_fields import MAX_SEED

TOO_BIG = 2**64  # torch.manual_seed takes at most 2**64 - 1


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own check
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    return err


def test_a_training_seed_past_64_bits_is_refused_with_the_largest(tmp_path, capsys):
    data = write_caption_data(tmp_path / "data", images=4)
    path = write_config(tmp_path / "t.yaml", config(data, tmp_path / "run", seed=TOO_BIG))
    err = usage_error(capsys, ["train", str(path)])
    assert f"seed: Input should be less than or equal to {MAX_SEED}" in err
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_trains(tmp_path):
    data = write_caption_data(tmp_path / "data", images=4)
    path = write_config(tmp_path / "t.yaml", config(data, tmp_path / "run", seed=MAX_SEED, steps=1, schedule={}))
    assert main(["train", str(path)]) == 0


def test_comparison_and_demo_seeds_past_64_bits_are_refused(tmp_path, capsys):
    values = {"runs": [{"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 1}], "output_dir": str(tmp_path / "out"),
              "stage2_data": {"format": "jsonl", "paths": ["train.jsonl"]}, "seeds": [0, TOO_BIG]}
    err = usage_error(capsys, ["compare", str(write_config(tmp_path / "c.yaml", values))])
    assert f"seeds.1: Input should be less than or equal to {MAX_SEED}" in err
    err = usage_error(capsys, ["demo", "--out", str(tmp_path / "demo"), "--seeds", str(TOO_BIG)])
    assert f"--seeds: {TOO_BIG} is more than {MAX_SEED}" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()


def test_a_query_count_given_twice_to_the_demo_is_named(tmp_path, capsys):
    err = usage_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "demo"), "--queries", "8", "8"])
    assert "--queries: give each query count once, got [8, 8]" in err
    assert not (tmp_path / "demo").exists()
