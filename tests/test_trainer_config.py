"""`vlbridge train` config validation: every problem at once, each with its YAML path, exit code 2
and a readable paragraph (never a traceback), before any weight loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlbridge

from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.train.config import TrainConfigError, check_config, read_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"), images=4)


def train_cli(capsys, tmp_path: Path, values: dict, *flags: str) -> tuple[int, str, str]:
    code = main(["train", str(write_config(tmp_path / "train.yaml", values)), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def test_structural_errors_come_together_with_their_paths(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", batch_size="four", wat=1, optimizer={"lr": 1e-3, "lrr": 2, "betas": [0.9, 1.5]})
    values["data"]["train"]["bogus"] = True
    values["data"]["extra"] = 1
    code, _, err = train_cli(capsys, tmp_path, values)
    assert_user_error(code, err, "6 problems", "batch_size: Input should be a valid integer", "wat: unknown key; valid keys are: assembly",
                      "optimizer.lrr: unknown key; valid keys are: lr, betas", "optimizer.betas: each beta must be in [0, 1)",
                      "data.train.bogus: unknown key; valid keys are: format, paths", "data.extra: unknown key; valid keys are: train, eval, features")


def test_data_cross_field_errors_keep_the_yaml_path(tmp_path, data):
    values = config(data, tmp_path / "out")
    values["data"]["train"]["split"] = "train"
    with pytest.raises(TrainConfigError, match=r"data\.train\.split: only used by formats coco and vqa"):
        read_config(values)


def test_a_dumped_config_loads_again(tmp_path, data):
    """The train.yaml a run writes (every default filled in) is a valid config for `vlbridge train`,
    also for a format that does not use some of the written-out defaults (image_pattern, shuffle_buffer)."""
    import yaml

    from vlbridge.train.config import dump_config

    values = config(data, tmp_path / "out")
    values["data"]["train"]["format"] = "jsonl"
    values["data"]["train"]["paths"] = [str(tmp_path / "pairs.jsonl")]
    first, _ = read_config(values)
    again, _ = read_config(yaml.safe_load(dump_config(first)))
    assert again == first
    values["data"]["train"]["shuffle_buffer"] = 10
    with pytest.raises(TrainConfigError, match=r"data\.train\.shuffle_buffer: only used by format 'webdataset'"):
        read_config(values)


def test_semantic_errors_come_together(capsys, tmp_path, data):
    llm_free = {"name": "no-llm", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8}}}
    values = config(data, tmp_path / "out", assembly=llm_free, stage=2, precision="fp16", device="cpu", epochs=2,
                    init_from=str(tmp_path / "nowhere"), objective={"bogus": 1})
    code, _, err = train_cli(capsys, tmp_path, values)
    assert_user_error(code, err, "steps, epochs: give exactly one", "init_from: ", "is not a directory",
                      "stage: stage 2 trains through the LLM, but the assembly has no llm slot",
                      "precision: fp16 needs a CUDA device", "objective.bogus: unknown key")


def test_stage_one_only_settings(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", assembly="tiny-linear-opt", prompt="a photo of", schedule={"warmup_steps": 8, "min_lr": 1.0})
    code, _, err = train_cli(capsys, tmp_path, values)
    assert_user_error(code, err, "prompt: only used in stage 2", "stage: connector 'linear' trains in stages [2], not stage 1",
                      "schedule.warmup_steps: 8 is not below steps (8)", "schedule.min_lr: 1.0 is above optimizer.lr")


def test_inline_assembly_problems_are_under_assembly(tmp_path, data):
    broken = {"name": "x", "encoder": {"use": "eva-vit-gg"}, "connector": {"use": "qformer"}, "llm": {"use": "opt", "options": {"size": 1}}}
    config_, label = read_config(config(data, tmp_path / "out", assembly=broken))
    with pytest.raises(TrainConfigError) as info:
        check_config(config_, label)
    assert any(p.startswith("assembly.encoder.use: ") for p in info.value.problems)
    assert any(p.startswith("assembly.llm.options.size: unknown option") for p in info.value.problems)


def test_unreadable_files(capsys, tmp_path):
    assert_user_error(main(["train", str(tmp_path / "missing.yaml")]), capsys.readouterr().err, "file not found")
    (tmp_path / "bad.yaml").write_text("stage: [1\n", encoding="utf-8")
    assert_user_error(main(["train", str(tmp_path / "bad.yaml")]), capsys.readouterr().err, "malformed YAML")
    (tmp_path / "list.yaml").write_text("- 1\n", encoding="utf-8")
    assert_user_error(main(["train", str(tmp_path / "list.yaml")]), capsys.readouterr().err, "expected a mapping")


def test_check_validates_without_training(capsys, tmp_path, data):
    code, out, err = train_cli(capsys, tmp_path, config(data, tmp_path / "out"), "--check")
    assert code == 0, err
    assert out.strip().endswith("valid") and "stage 1; steps 8; batch 4 x grad_accum 1" in out
    assert not (tmp_path / "out").exists()


def test_check_refuses_a_batch_larger_than_the_data(capsys, tmp_path, data):
    """A batch_size above the sample count passed --check; training then loaded every weight before saying so."""
    values = config(data, tmp_path / "out")
    values["batch_size"] = 10_000
    code, _, err = train_cli(capsys, tmp_path, values, "--check")
    assert_user_error(code, err, "make no full batch of batch_size 10000, and drop_last drops the incomplete one")
    values["drop_last"] = False
    code, _, err = train_cli(capsys, tmp_path, values, "--check")
    assert code == 0, err


def test_an_existing_run_needs_resume(capsys, tmp_path, data):
    step = tmp_path / "out" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "trainer_state.pt").write_bytes(b"")
    (step.parent / "latest").write_text("step-3\n")
    code, _, err = train_cli(capsys, tmp_path, config(data, tmp_path / "out"))
    assert_user_error(code, err, "already holds checkpoints (latest: step-3); pass --resume")


def test_one_run_per_output_dir(capsys, tmp_path, data):
    from vlbridge.train.checkpointing import exclusive

    with exclusive(tmp_path / "out"):  # as a run in progress holds it
        code, _, err = train_cli(capsys, tmp_path, config(data, tmp_path / "out"))
    assert_user_error(code, err, "is in use by another run (pid ")


@pytest.mark.parametrize("name", ["train-stage1-tiny.yaml", "train-stage2-tiny.yaml"])
def test_examples_validate(capsys, repo, tmp_path, monkeypatch, name):
    from vlbridge.world.config import WorldConfig
    from vlbridge.world.generate import generate_world

    monkeypatch.chdir(tmp_path)  # their paths are relative to where they run
    # stage 2's init_from: a run's output_dir, whose latest checkpoint --check reads the tensor shapes of
    step = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "runs" / "stage1-tiny" / "checkpoints" / "step-1")
    (step / "trainer_state.pt").write_bytes(b"")  # what makes a run's step complete (never read by --check)
    (step.parent / "latest").write_text("step-1\n")
    generate_world(tmp_path / "world", WorldConfig(train=2, val=1, test=0, comp=0, image_size=16))  # --check reads the data's files (2 images: 18 captions, a batch of 16)
    code = main(["train", str(repo / "examples" / name), "--check"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip().endswith("valid")
