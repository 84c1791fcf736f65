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
