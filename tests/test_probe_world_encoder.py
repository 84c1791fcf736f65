"""bench/probe_world_encoder.py runs end to end on a tiny generated world and reports every attribute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlbridge.world import WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]


def test_probe_reports_each_attribute(tmp_path: Path):
    generate_world(tmp_path / "world", WorldConfig(train=12, val=0, test=6, comp=0))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_world_encoder.py"), "--world", str(tmp_path / "world"),
                           "--train", "12", "--test", "6", "--steps", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["train_images"], result["test_images"], result["steps"]) == (12, 6, 3)
    for key in ("colour_on_occupied_cells", "shape_on_occupied_cells", "size_on_occupied_cells", "occupancy"):
        assert 0.0 <= result[key] <= 1.0, key
