"""Every command's --help tells a new user what it does and what its arguments are."""

from __future__ import annotations

import pytest

from vlbridge.cli.main import main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_demo_help_describes_the_experiment(capsys):
    text = _help(capsys, "demo")
    assert "Q-Former" in text and "report.md" in text and "stdout" in text


def test_compare_help_describes_its_config(capsys):
    text = _help(capsys, "compare")
    for key in ("runs", "evals", "stage1_data", "stage2_data", "seeds", "output_dir", "examples/compare-world.yaml"):
        assert key in text, key


def test_compare_help_names_every_config_key(capsys):
    from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec

    text = " ".join(_help(capsys, "compare").split())  # argparse wraps lines
    for model in (CompareConfig, RunSpec, EvalSet):
        for key in model.model_fields:
            assert key in text, f"{model.__name__}.{key}"


@pytest.mark.parametrize("fmt", ["hf-blip2", "hf-instructblip", "hf-llava"])
def test_import_and_export_help_explain_their_folders(capsys, fmt):
    text = _help(capsys, "import", fmt)
    assert "DIR " in text and "OUT_DIR " in text and "save_pretrained" in text and "vlbridge checkpoint" in text
    text = _help(capsys, "export", fmt)
    assert "CHECKPOINT_DIR " in text and "OUT_DIR " in text and "from_pretrained" in text


def test_import_lavis_help_explains_its_file_and_folder(capsys):
    """Its help was a bare usage line: nothing said what PTH is or what the command writes."""
    text = " ".join(_help(capsys, "import", "lavis").split())
    assert "LAVIS" in text and "blip2_pretrained.pth" in text and "weights_only" in text
    assert "OUT_DIR " in text and "vlbridge.load(OUT_DIR)" in text and "--checkpoint OUT_DIR" in text


def test_world_generate_help_shows_defaults(capsys):
    text = _help(capsys, "world", "generate")
    assert "default 3000" in text and "default 64" in text and "default 0" in text
