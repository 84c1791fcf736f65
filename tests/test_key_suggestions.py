"""A misspelt key in a config names the key the user most likely meant, after the list of valid
ones (which alone leaves them to find it among thirty): training configs, their data sections,
comparison configs, assembly options and generation settings. Torch-free but for generation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vlbridge.compare import CompareConfig
from vlbridge.data.config import load_data_config
from vlbridge.data.records import DataConfigError
from vlbridge.errors import AssemblyError
from vlbridge.files.config_fields import did_you_mean
from vlbridge.train.config import TrainConfig, TrainConfigError, pydantic_problems, read_config
from vlbridge.assemblies.assembly import load_assembly


def test_a_typo_is_matched_and_a_stranger_is_not():
    assert did_you_mean("batchsize", TrainConfig.model_fields) == "; did you mean 'batch_size'?"
    assert did_you_mean("wat", TrainConfig.model_fields) == ""


def test_training_config_keys_at_every_depth(tmp_path):
    raw = {"assembly": "tiny-qformer-opt", "stage": 1, "bach_size": 2, "steps": 1, "output_dir": "out", "optimiser": {"lr": 1e-3},
           "data": {"train": {"format": "jsonl", "paths": ["x.jsonl"], "image_rot": "."}}, "schedule": {"warmup_stpes": 0}}
    with pytest.raises(TrainConfigError) as info:
        read_config(raw)
    problems = "\n".join(info.value.problems)
    assert "bach_size: unknown key; valid keys are: assembly," in problems and "did you mean 'batch_size'?" in problems
    assert "optimiser: unknown key; valid keys are:" in problems and "did you mean 'optimizer'?" in problems
    assert "schedule.warmup_stpes: unknown key; valid keys are: warmup_steps, warmup_lr, min_lr; did you mean 'warmup_steps'" in problems
    assert "did you mean 'image_root'?" in problems


def test_data_comparison_and_assembly_keys():
    with pytest.raises(DataConfigError, match="did you mean 'num_workers'"):
        load_data_config({"format": "jsonl", "paths": ["x.jsonl"], "num_worker": 0}, "data")
    with pytest.raises(ValidationError) as info:
        CompareConfig.model_validate({"runs": [{"name": "a", "assembly": "tiny-mlp-opt", "stage2_step": 1}], "output_dir": "o",
                                      "stage2_data": {"format": "jsonl", "paths": ["x.jsonl"]}})
    assert any("runs.0.stage2_step: unknown key" in p and "did you mean 'stage2_steps'" in p
               for p in pydantic_problems(info.value, CompareConfig))
    with pytest.raises(AssemblyError, match="encoder.options.varient: unknown option; valid options are: variant, .*did you mean 'variant'"):
        load_assembly({"name": "x", "encoder": {"use": "eva-vit-g", "options": {"varient": "tiny"}}, "connector": {"use": "linear"},
                       "llm": {"use": "opt", "options": {"variant": "tiny"}}})
