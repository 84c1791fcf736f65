"""The `finetune:` section: bad options are config errors naming the key and what would be right
(CLI exit 2), the feature cache is refused for an unfrozen encoder, `vlbridge validate --train`
counts what each recipe trains, and the example config runs through `vlbridge train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.finetune_helpers import ENCODER_LAST, LORA, stage2
from tests.test_trainer_samples import write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.train.config import TrainConfigError, check_config, read_config
from vlbridge.train.finetune_config import EncoderTuning, FinetuneConfig, LoraTuning

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train-stage2-finetune-tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"))


def problems(values) -> list[str]:
    with pytest.raises(TrainConfigError) as info:
        config, label = read_config(values)
        check_config(config, label, device_check=False)
    return info.value.problems


def test_defaults_are_the_frozen_bridge(tmp_path, data):
    config, _ = read_config(stage2(data, tmp_path, {}))
    assert config.finetune == FinetuneConfig() and not config.finetune.active
    assert config.finetune.encoder.unfreeze == "none" and config.finetune.lora is None
    lora = LoraTuning()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.lr) == (8, 16.0, 0.05, None, None)


@pytest.mark.parametrize("unfreeze, expected", [("all", "all"), ("None", "none"), (3, 3), (True, "all"), (None, "none")])
def test_unfreeze_values(unfreeze, expected):
    assert EncoderTuning(unfreeze=unfreeze).unfreeze == expected


@pytest.mark.parametrize("finetune, message", [
    ({"encoder": {"unfreeze": 0}}, "finetune.encoder.unfreeze: give none, all, or the number of last encoder blocks to train"),
    ({"encoder": {"unfreeze": "some"}}, "finetune.encoder.unfreeze: give none, all, or the number"),
    ({"encoder": {"unfreeze": "all", "layer_decay": 1.5}}, "finetune.encoder.layer_decay: Input should be less than or equal to 1"),
    ({"encoder": {"unfreeze": "all", "lr": 0}}, "finetune.encoder.lr: Input should be greater than 0"),
    ({"encoder": {"unfrozen": "all"}}, "finetune.encoder.unfrozen: unknown key; valid keys are: unfreeze, lr, layer_decay, grad_checkpointing"),
    ({"lora": {"rank": 4}}, "finetune.lora.rank: unknown key; valid keys are: r, alpha, dropout, target_modules, lr"),
    ({"lora": {"target_modules": []}}, "finetune.lora.target_modules: give at least one module name"),
    ({"lora": {"dropout": 1.0}}, "finetune.lora.dropout: Input should be less than 1"),
    ({"encoder": {"layer_decay": 0.9}}, "finetune.encoder.layer_decay: the encoder is frozen (unfreeze: none)"),
    ({"encoder": {"grad_checkpointing": True}}, "finetune.encoder.grad_checkpointing: the encoder is frozen"),
    ({"encoder": {"lr": 1e-5}}, "finetune.encoder.lr: the encoder is frozen"),
])
def test_bad_options_name_the_key(tmp_path, data, finetune, message):
    found = problems(stage2(data, tmp_path, finetune))
    assert any(message in p for p in found), found


def test_lora_needs_stage_2(tmp_path, data):
    found = problems(stage2(data, tmp_path, LORA, stage=1))
    assert any(p.startswith("finetune.lora: LoRA adapts the LLM, which only stage 2 runs") for p in found), found


def test_the_feature_cache_is_refused_for_an_unfrozen_encoder(tmp_path, data):
    values = stage2(data, tmp_path / "out", {"encoder": {"unfreeze": 1}})
    values["data"]["features"] = str(tmp_path)  # exists; its contents do not matter: the combination is refused
    found = problems(values)
    assert any(p.startswith("data.features: the feature cache holds the frozen encoder's outputs") and "stale" in p for p in found), found
    values["finetune"] = LORA  # LoRA leaves the encoder frozen: the cache stays usable (checked no further here)
    config, _ = read_config(values)
    assert not [p for p in _field_only(config) if p.startswith("data.features")]


def _field_only(config) -> list[str]:
    from vlbridge.train.config import _field_problems

    return _field_problems(config)


def test_cli_exits_2_on_a_config_error_and_on_a_build_time_one(capsys, tmp_path, data):
    bad = write_config(tmp_path / "bad.yaml", stage2(data, tmp_path / "o1", {"encoder": {"unfreeze": -1}}))
    assert main(["train", str(bad)]) == 2
    assert "finetune.encoder.unfreeze: give none, all" in capsys.readouterr().err
    deep = write_config(tmp_path / "deep.yaml", stage2(data, tmp_path / "o2", {"encoder": {"unfreeze": 5}}))
    assert main(["train", str(deep)]) == 2
    err = capsys.readouterr().err
    assert "finetune.encoder.unfreeze: 5 blocks asked for, but encoder 'eva-vit-g'" in err and "runs 2; give 1 to 2, or all" in err
    targets = write_config(tmp_path / "t.yaml", stage2(data, tmp_path / "o3", {"lora": {"target_modules": ["query"]}}))
    assert main(["train", str(targets)]) == 2
    err = capsys.readouterr().err
    assert "finetune.lora.target_modules: ['query'] matches no layer" in err and "q_proj" in err


def test_validate_train_counts_each_part(capsys, tmp_path, data):
    path = write_config(tmp_path / "ft.yaml", stage2(data, tmp_path / "out", {**ENCODER_LAST, **LORA}))
    assert main(["validate", "--train", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    counts = report["trainable"]
    block = 64 * 192 + 2 * 64 + 64 * 64 + 64 + 4 * 64 + 64 * 256 + 256 + 256 * 64 + 64  # one tiny EVA block
    lora = 2 * 2 * 4 * (64 + 64)  # 2 layers x (q_proj, v_proj) x r (in + out)
    assert counts["encoder"] == block and counts["lora"] == lora
    assert counts["total"] == counts["connector"] + block + lora and report["valid"] and report["stage"] == 2
    assert main(["validate", "--train", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"encoder {block:,} (last 1 of 2 blocks, lr 0.002, layer decay 0.5, gradient checkpointing)" in out
    assert f"LoRA {lora:,} (r 4 on q_proj, v_proj)" in out and out.strip().endswith("valid")
    assert main(["validate"]) == 2 and "exactly one of them" in capsys.readouterr().err


def test_validate_train_json_reports_problems(capsys, tmp_path, data):
    path = write_config(tmp_path / "ft.yaml", stage2(data, tmp_path / "out", {"encoder": {"unfreeze": 9}}))
    assert main(["validate", "--train", str(path), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert not report["valid"] and "9 blocks asked for" in report["problems"][0]


def test_example_config_checks_and_trains(capsys, tmp_path, monkeypatch):
    """The example as shipped passes `--check`; with the tiny world and fewer steps it trains."""
    monkeypatch.chdir(tmp_path)
    assert main(["world", "generate", "--out", "world", "--train", "16", "--val", "8", "--test", "0", "--comp", "0"]) == 0
    assert main(["train", str(EXAMPLE), "--check"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning: encoder: last 1 block" in out and "LoRA: r 8" in out
    values = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert values["finetune"]["encoder"]["unfreeze"] == 1 and values["finetune"]["lora"]["r"] == 8
    values.update(steps=4, batch_size=4, log_every=2, eval_every=None, save_every=None, keep_last=None, tensorboard=False)
    values["schedule"]["warmup_steps"] = 1
    for split in ("train", "eval"):
        values["data"][split]["num_workers"] = 0
    values["data"]["eval"]["limit"] = 4
    path = write_config(tmp_path / "short.yaml", values)
    assert main(["train", str(path)]) == 0
    captured = capsys.readouterr()
    assert "trained to step 4" in captured.out
    assert "+ encoder" in captured.err and "+ LoRA" in captured.err  # the start line's breakdown
    step = Path(values["output_dir"]) / "checkpoints" / "step-4"
    assert (step / "encoder.safetensors").is_file() and (step / "lora.safetensors").is_file()


def test_every_option_is_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "fine-tuning.md").read_text(encoding="utf-8")
    example = EXAMPLE.read_text(encoding="utf-8")
    for section, model in (("encoder", EncoderTuning), ("lora", LoraTuning)):
        for name in model.model_fields:
            assert f"`{section}.{name}`" in text, f"docs/fine-tuning.md lacks {section}.{name}"
            assert name in example, f"the example's option list lacks {section}.{name}"


def test_components_lists_the_fine_tuning_recipes(capsys):
    from vlbridge.cli.main import main

    assert main(["components"]) == 0
    out = capsys.readouterr().out
    assert "recipe finetune.encoder" in out and "recipe finetune.lora" in out
    assert "instruction_aware = False" in out  # the qformer's InstructBLIP option
