"""examples/compare-world.yaml is a valid comparison whose paths are what `vlbridge world generate` writes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.compare import CompareConfig
from vlbridge.world import WorldConfig, generate_world

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compare-world.yaml"


def test_example_compare_config_fits_a_generated_world(tmp_path: Path, monkeypatch):
    generate_world(tmp_path / "world", WorldConfig(train=4, val=0, test=3, comp=0))
    monkeypatch.chdir(tmp_path)  # the example's paths are relative to the working directory
    config = CompareConfig.model_validate(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    for run in config.runs:
        load_assembly(run.assembly)  # every preset exists and validates
    for data in (config.stage1_data, config.stage2_data):
        assert all(Path(p).is_file() for p in data["paths"]), data
    [test] = config.evals
    for name in ("captions", "questions", "annotations", "scenes"):
        assert Path(getattr(test, name)).is_file(), name
    question = json.loads(Path(test.questions).read_text(encoding="utf-8"))["questions"][0]
    image = Path(test.images) / test.image_pattern.format(split="test", image_id=question["image_id"])
    assert image.is_file(), image
