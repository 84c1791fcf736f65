"""`-c DIR` (and init_from): a run's output_dir loads its latest step and says which; anything else
is an error saying what the directory is, e.g. the exact `vlbridge import` command for a
transformers BLIP-2 / InstructBLIP / LLaVA directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlbridge.files.checkpoint_source import IMPORTABLE, resolve_checkpoint
from vlbridge.cli.convert import TRANSFORMERS_FORMATS
from vlbridge.cli.main import main
from vlbridge.errors import WeightsError


def fake_run(root: Path, steps: tuple[int, ...], latest: int | None) -> Path:
    """An output_dir layout: checkpoints/step-N with the files resolution looks at, and `latest`."""
    for step in steps:
        folder = root / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.pt").write_bytes(b"")
        (folder / "checkpoint.json").write_text('{"stage": 1}', encoding="utf-8")
    if latest is not None:
        (root / "checkpoints" / "latest").write_text(f"step-{latest}\n", encoding="utf-8")
    return root


def test_a_run_output_dir_resolves_to_its_latest_step_and_says_so(tmp_path):
    run = fake_run(tmp_path / "run", (2, 4), latest=4)
    source = resolve_checkpoint(run, "-c")
    assert source.directory == run / "checkpoints" / "step-4"
    assert "training run's output_dir; using its latest checkpoint" in source.note and "(step-4)" in source.note


def test_steps_without_a_latest_pointer_are_listed_not_guessed(tmp_path):
    run = fake_run(tmp_path / "run", (2, 4), latest=None)
    with pytest.raises(WeightsError, match=r"without a checkpoints/latest pointer; give one of its steps: .*step-2, .*step-4"):
        resolve_checkpoint(run, "-c")


def test_a_checkpoint_directory_is_taken_as_it_is(tmp_path):
    (tmp_path / "checkpoint.json").write_text('{"stage": 2}', encoding="utf-8")
    assert resolve_checkpoint(tmp_path).directory == tmp_path and resolve_checkpoint(tmp_path).note is None


@pytest.mark.parametrize("config, fmt", [
    ({"model_type": "blip-2"}, "hf-blip2"),
    ({"model_type": "instructblip"}, "hf-instructblip"),
    ({"model_type": "llava"}, "hf-llava"),
    ({"architectures": ["LlavaForConditionalGeneration"]}, "hf-llava"),
])
def test_a_transformers_directory_gets_its_import_command(tmp_path, config, fmt):
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(WeightsError, match=f"convert it once with `vlbridge import {fmt} {tmp_path} OUT_DIR`"):
        resolve_checkpoint(tmp_path, "-c")


def test_every_importable_format_is_a_real_import_command():
    assert set(IMPORTABLE.values()) <= set(TRANSFORMERS_FORMATS)


def test_a_plain_language_model_directory_is_named_as_one(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "opt"}', encoding="utf-8")
    with pytest.raises(WeightsError, match=r"holds a transformers 'opt' model, which is not a vision-language checkpoint"):
        resolve_checkpoint(tmp_path, "-c")


@pytest.mark.parametrize("command", ["caption", "eval"])
def test_cli_missing_directory_is_not_called_a_checkpoint(capsys, tmp_path, command):
    image = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = {"caption": ["caption", "-c", str(tmp_path / "nope"), str(image)],
            "eval": ["eval", "-c", str(tmp_path / "nope"), "--task", "caption", "--data", str(tmp_path / "c.json")]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"--checkpoint {tmp_path / 'nope'}: no such directory" in err
    assert "not a vlbridge checkpoint" not in err


def test_cli_caption_from_a_run_output_dir(capsys, tmp_path):
    import vlbridge

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-3"
    vlbridge.build("tiny-linear-opt").save(step)
    (step / "trainer_state.pt").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step-3\n", encoding="utf-8")
    image = tmp_path / "i.png"
    Image.new("RGB", (16, 16), (0, 90, 200)).save(image)
    code = main(["caption", "-c", str(run), "--num-beams", "1", "--max-new-tokens", "2", "--json", str(image)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"using its latest checkpoint {step} (step-3)" in err and json.loads(out)[0]["image"] == str(image)


def test_python_load_takes_a_run_output_dir_as_the_cli_does(tmp_path):
    """vlbridge.load("runs/stage2") (the README's lmms-eval example) loads the run's latest step."""
    import torch

    import vlbridge

    run = tmp_path / "run"
    model = vlbridge.build("tiny-linear-opt")
    model.save(run / "checkpoints" / "step-3")
    (run / "checkpoints" / "step-3" / "trainer_state.pt").write_bytes(b"")  # what makes a run's step complete
    (run / "checkpoints" / "latest").write_text("step-3\n", encoding="utf-8")
    loaded, built = vlbridge.load(run), vlbridge.build("tiny-linear-opt", weights=run, init_seed=1)  # build's weights= too
    for key, value in model.connector.state_dict().items():
        assert torch.equal(loaded.connector.state_dict()[key], value) and torch.equal(built.connector.state_dict()[key], value)
    with pytest.raises(WeightsError, match=r"weights= .* is not a vlbridge checkpoint"):
        vlbridge.build("tiny-linear-opt", weights=tmp_path)
    with pytest.raises(WeightsError, match=r"vlbridge.load: .* no such directory"):
        vlbridge.load(tmp_path / "nowhere")
