"""The report says where runs are not on equal footing: a per-run override (here the projector's lr
and the Q-Former's stage 1) used to change the comparison without a word in report.md."""

from __future__ import annotations

from vlbridge.compare import CompareConfig
from vlbridge.compare.footing import footing_notes

DATA = {"format": "jsonl", "paths": ["train.jsonl"]}
EVALS = [{"name": "test", "captions": "test.json", "tasks": ["caption"]}]


def _config(*runs: dict) -> CompareConfig:
    return CompareConfig.model_validate({"runs": list(runs), "output_dir": "out", "stage1_data": DATA, "stage2_data": DATA,
                                         "evals": EVALS, "lr": 2e-3, "batch_size": 8})


def test_overrides_are_stated():
    notes = footing_notes(_config({"name": "qformer", "assembly": "tiny-qformer-opt", "stage1_steps": 4, "stage2_steps": 6},
                                  {"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 6, "lr": 1e-3}))
    assert notes[0].startswith("Training shared by every trained run: batch 8")
    assert "Runs differ in peak lr: qformer 0.002; mlp 0.001." in notes
    assert "Runs differ in stage-1 steps: qformer 4; mlp 0." in notes
    assert not any("stage-2 steps" in n for n in notes)


def test_equal_runs_are_said_to_be_equal():
    notes = footing_notes(_config({"name": "linear", "assembly": "tiny-linear-opt", "stage2_steps": 6},
                                  {"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 6}))
    assert len(notes) == 1 and "are the same for every run" in notes[0]
