"""The encoder probe: cells pool the right patches, and bench/probe_world_encoder.py runs end to end
on a tiny generated world and reports every attribute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlbridge.world import WorldConfig, generate_world
from vlbridge.world.encoder_probe import cell_pool

ROOT = Path(__file__).resolve().parents[1]


def test_probe_reports_each_attribute(tmp_path: Path):
    generate_world(tmp_path / "world", WorldConfig(train=12, val=0, test=6, comp=0))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_world_encoder.py"), "--world", str(tmp_path / "world"),
                           "--train", "12", "--test", "6", "--steps", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["train_images"], result["test_images"], result["steps"]) == (12, 6, 3)
    for key in ("colour", "shape", "size", "position"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["test_objects"] > 0


def test_cells_average_the_patches_whose_centre_they_hold():
    grid = 8  # patch centres at 1/16, 3/16, ...: cell columns take 3, 2 and 3 patches
    patches = torch.arange(grid * grid, dtype=torch.float32).view(1, grid * grid, 1)
    tokens = torch.cat([torch.full((1, 1, 1), 1e6), patches], dim=1)  # [CLS] must not leak in
    cells = cell_pool(tokens)[0, :, 0]
    assert cells.shape == (9,)
    assert cells[0].item() == pytest.approx(sum([0, 1, 2, 8, 9, 10, 16, 17, 18]) / 9)
    assert cells[4].item() == pytest.approx(sum([27, 28, 35, 36]) / 4)


def test_bad_counts_and_worlds_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`--train 0`, `--test 0` and a --world without a train or test split died in torch.cat or
    with FileNotFoundError tracebacks; they are usage errors (exit 2) that say what is wrong."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_world_encoder", ROOT / "bench" / "probe_world_encoder.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    generate_world(tmp_path / "no-test", WorldConfig(train=2, val=0, test=0, comp=0, image_size=16))
    for argv, words in ((["--train", "0"], "at least 1"), (["--test", "0"], "at least 1"), (["--steps", "0"], "at least 1"),
                        (["--world", str(tmp_path / "missing")], "scenes_train.json not found"),
                        (["--world", str(tmp_path / "no-test")], "scenes_test.json holds no images")):
        with pytest.raises(SystemExit) as exit_info:
            probe.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err, (argv, err)
