"""`vlbridge import lavis` and `vlbridge export FMT CHECKPOINT_DIR OUT` check what they are given the
way caption's -a and -c are checked: a misspelt assembly before torch loads, and CHECKPOINT_DIR
through vlbridge.files.checkpoint_source (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlbridge.cli.main import main

LAVIS_SCRIPT = """
import sys
from vlbridge.cli.main import main
code = main(["import", "lavis", "missing.pth", "out", "-a", "tiny-qformer-op"])
print("CODE", code, "TORCH", "torch" in sys.modules, file=sys.stderr)
"""


def test_import_lavis_reports_a_misspelt_assembly_before_torch_loads(tmp_path):
    result = subprocess.run([sys.executable, "-c", LAVIS_SCRIPT], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert "CODE 2 TORCH False" in result.stderr, result.stderr[-3000:]
    assert "tiny-qformer-opt" in result.stderr  # the did-you-mean
    assert not (tmp_path / "out").exists()


def test_export_names_a_missing_checkpoint_dir(tmp_path, capsys):
    code = main(["export", "hf-blip2", str(tmp_path / "nope"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"CHECKPOINT_DIR {tmp_path / 'nope'}: no such directory" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_export_of_a_transformers_directory_gives_the_import_command(tmp_path, capsys):
    foreign = tmp_path / "blip2-hf"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "blip-2"}), encoding="utf-8")
    code = main(["export", "hf-llava", str(foreign), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"`vlbridge import hf-blip2 {foreign} OUT_DIR`" in err, err


def test_export_of_a_run_output_dir_uses_its_latest_step_and_says_so(tmp_path, capsys):
    pytest.importorskip("torch")
    import vlbridge

    step = tmp_path / "run" / "checkpoints" / "step-3"
    vlbridge.build("tiny-qformer-opt").save(step)
    (step / "trainer_state.pt").write_bytes(b"")  # what marks a step complete
    (step.parent / "latest").write_text("step-3\n", encoding="utf-8")
    code = main(["export", "hf-blip2", str(tmp_path / "run"), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "training run's output_dir; using its latest checkpoint" in captured.err and "(step-3)" in captured.err
    assert (Path(tmp_path / "out") / "config.json").is_file()
