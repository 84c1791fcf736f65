"""A comparison reuses a run's stored result only if the run would train the same model: an edited
assembly YAML (another connector, LLM or option under the same file name) used to keep its key, so
the rerun reported the old model's scores as the new one's."""

from __future__ import annotations

import shutil

import yaml

from vlbridge.compare import CompareConfig
from vlbridge.compare.runner import run_key, training_key
from vlbridge.plugin.resources import presets


def _config(assembly: str) -> CompareConfig:
    return CompareConfig.model_validate({
        "runs": [{"name": "proj", "assembly": assembly, "stage2_steps": 2}], "output_dir": "out",
        "stage2_data": {"format": "jsonl", "paths": ["train.jsonl"]},
        "evals": [{"name": "test", "captions": "test.json", "tasks": ["caption"]}]})


def test_an_edited_assembly_file_is_trained_afresh(tmp_path):
    path = tmp_path / "projector.yaml"
    raw = presets()["tiny-mlp-opt"]
    path.write_text(yaml.safe_dump(raw))
    config = _config(str(path))
    before = training_key(config, config.runs[0], 0), run_key(config, config.runs[0], 0)
    path.write_text(yaml.safe_dump({**raw, "connector": {"use": "linear"}}))
    after = training_key(config, config.runs[0], 0), run_key(config, config.runs[0], 0)
    assert before[0] != after[0] and before[1] != after[1]


def test_an_unchanged_assembly_keeps_its_key(tmp_path):
    config = _config("tiny-mlp-opt")
    assert training_key(config, config.runs[0], 0) == training_key(_config("tiny-mlp-opt"), config.runs[0], 0)


def test_stage1_settings_retrain_only_the_runs_with_a_stage1():
    """A new stage-1 objective retrains the Q-Former, not the projectors, which have no stage 1."""
    def config(max_text_tokens: int) -> CompareConfig:
        data = {"format": "jsonl", "paths": ["train.jsonl"]}
        return CompareConfig.model_validate({
            "runs": [{"name": "q", "assembly": "tiny-qformer-opt", "stage1_steps": 2, "stage2_steps": 2},
                     {"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 2}],
            "output_dir": "out", "stage1_data": data, "stage2_data": data, "stage1_objective": {"max_text_tokens": max_text_tokens},
            "evals": [{"name": "test", "captions": "test.json", "tasks": ["caption"]}]})
    before, after = config(24), config(32)
    assert training_key(before, before.runs[0], 0) != training_key(after, after.runs[0], 0)
    assert training_key(before, before.runs[1], 0) == training_key(after, after.runs[1], 0)


def test_the_key_does_not_depend_on_where_vlbridge_is_installed(tmp_path):
    """The world presets name their parts by absolute paths into the installed package; the key held
    them, so a reinstall elsewhere (another venv, pip install . after -e .) retrained every run."""
    from vlbridge.compare.runner import _location_free

    here, there = ({"llm": {"use": "opt", "options": {"model": str(tmp_path / place / "world" / "opt")}}, "name": "x"} for place in "ab")
    placed = {"llm": {"use": "opt", "options": {"model": "{world}/opt"}}, "name": "x"}
    assert _location_free(here, {"world": str(tmp_path / "a" / "world")}) == placed
    assert _location_free(there, {"world": str(tmp_path / "b" / "world")}) == placed
    assert _location_free({"model": "facebook/opt-125m"}) == {"model": "facebook/opt-125m"}  # a hub id is no path


def test_models_in_folders_of_the_same_name_keep_their_own_keys(tmp_path):
    """Cutting every existing absolute path to its last part keyed /models/a/final and /models/b/final
    alike, so swapping the LLM folder in an assembly reused the other model's stored result."""
    raw = presets()["world-mlp-opt"]
    keys = []
    for place in "ab":
        shutil.copytree(raw["llm"]["options"]["model"], tmp_path / place / "final")
        path = tmp_path / "assembly.yaml"  # the same file, edited
        path.write_text(yaml.safe_dump({**raw, "llm": {"use": "opt", "options": {"model": str(tmp_path / place / "final")}}}))
        config = _config(str(path))
        keys.append(training_key(config, config.runs[0], 0))
    assert keys[0] != keys[1]
