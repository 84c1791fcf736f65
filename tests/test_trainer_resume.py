"""`vlbridge train --resume` after SIGKILL ends with bit-identical weights (and the same metrics
lines) as a run that was never interrupted: real CLI, real stage-1 objective, separate processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_trainer_samples import config, read_metrics, subprocess_env, write_caption_data, write_config

STEPS = 12
TRAIN = [sys.executable, "-m", "vlbridge", "train"]


def start(config_path: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([*TRAIN, str(config_path), *flags], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    return out


def kill_after_checkpoint(process: subprocess.Popen, latest: Path, wanted: str) -> str:
    """SIGKILL the run shortly after `latest` names `wanted` (some steps past the checkpoint)."""
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() == wanted):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    return latest.read_text().strip()


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = write_caption_data(tmp_path / "data")
    common = dict(with_eval=True, steps=STEPS, save_every=2, eval_every=6, log_every=1)
    whole = write_config(tmp_path / "whole.yaml", config(data, tmp_path / "whole", **common))
    broken = write_config(tmp_path / "broken.yaml", config(data, tmp_path / "broken", **common))
    reference, victim = start(whole), start(broken)
    killed_at = kill_after_checkpoint(victim, tmp_path / "broken" / "checkpoints" / "latest", "step-4")
    assert killed_at != f"step-{STEPS}"
    resumed = finish(start(broken, "--resume"))
    finish(reference)
    assert f"step {STEPS}" in resumed
    final = f"checkpoints/step-{STEPS}/connector.safetensors"
    expected, got = load_file(tmp_path / "whole" / final), load_file(tmp_path / "broken" / final)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected), "resumed weights differ from the uninterrupted run"
    assert without_timing(read_metrics(tmp_path / "broken")) == without_timing(read_metrics(tmp_path / "whole"))


def test_sigterm_ends_the_run_as_an_interrupt_with_the_resume_hint(tmp_path):
    """SIGTERM (how a scheduler or torchrun stops a job) killed the run without a word (exit -15); it now
    ends as Ctrl-C does: the resume hint, exit 143 (128 + 15), the lock released."""
    data = write_caption_data(tmp_path / "data")
    path = write_config(tmp_path / "run.yaml", config(data, tmp_path / "run", steps=400, save_every=2, log_every=1))
    process = start(path)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlbridge train: terminated (SIGTERM); the last checkpoint is ") and last.endswith(f"{path} --resume"), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / ".lock").exists()
