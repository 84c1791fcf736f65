"""Resuming from a run whose latest checkpoint an outside tester damaged on purpose (a file emptied
or cut short, as a full disk or a bad copy leaves it; an emptied `latest` pointer): each is a user
error (exit 2) naming the file and the way on, from the newest complete checkpoint before it,
never an internal error. And a resume with fewer steps than the run has made says it trains nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_trainer_samples import as_old_trainer_state, config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.files.state_file import read_state, write_state
from vlbridge.train import checkpointing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run with checkpoints step-2 and step-4, and its config (4 steps)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_caption_data(root / "data", images=4)
    path = write_config(root / "t.yaml", config(data, root / "run", steps=4, save_every=2))
    assert main(["train", str(path)]) == 0
    return root / "run", path


def damage(run_dir: Path, name: str, keep: int, tmp_path: Path) -> Path:
    """A copy of the run with `name` of its latest checkpoint cut to its first `keep` bytes (a negative
    `keep`: all but the last -keep); an older run's trainer_state.pt is made first where it is `name`."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    target = copy / checkpointing.CHECKPOINTS / ("step-4" if name != checkpointing.LATEST else "") / name
    if name == checkpointing.OLD_TRAINER_STATE:
        as_old_trainer_state(target.parent)
    target.write_bytes(target.read_bytes()[:keep])
    return copy


@pytest.mark.parametrize("name, keep", [("train.yaml", 0), ("train.yaml", 40), ("trainer_state.safetensors", 0),
                                        ("trainer_state.safetensors", 100), ("trainer_state.safetensors", -10),
                                        ("trainer_state.pt", 0), ("checkpoint.json", 10), ("connector.safetensors", 100)])
def test_a_damaged_file_of_the_latest_checkpoint_names_the_file_and_the_older_one(capsys, tmp_path, run, name, keep):
    copy = damage(run[0], name, keep, tmp_path)
    values = write_config_values(run[1], copy)
    code = main(["train", str(write_config(tmp_path / "t.yaml", values)), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    assert f"cannot resume from {copy / 'checkpoints' / 'step-4'}" in err and name in err
    assert f"to resume from the newest complete one, step-2, write that name into {copy / 'checkpoints' / 'latest'}" in err


def test_an_emptied_latest_pointer_says_it_is_empty(capsys, tmp_path, run):
    copy = damage(run[0], checkpointing.LATEST, 0, tmp_path)
    values = write_config_values(run[1], copy)
    code = main(["train", str(write_config(tmp_path / "t.yaml", values)), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err
    assert f"{copy / 'checkpoints' / 'latest'} is empty; to resume from the newest complete one, step-4" in err
    assert "names checkpoints" not in err


def write_config_values(path: Path, output_dir: Path) -> dict:
    """The run's config with another output_dir."""
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    values["output_dir"] = str(output_dir)
    return values


def test_a_resume_with_fewer_steps_than_made_says_nothing_is_trained(capsys, tmp_path, run):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    values = {**write_config_values(run[1], copy), "steps": 2, "schedule": {}}
    assert main(["train", str(write_config(tmp_path / "t.yaml", values)), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "note: the checkpoint is at step 4, past the 2 steps this config trains; nothing is trained" in err
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["latest", "step-2", "step-4"]


@pytest.mark.parametrize("resume", [True, False])
def test_checkpoints_without_a_latest_pointer_are_named_not_mixed_with_a_new_run(capsys, tmp_path, run, resume):
    """Complete steps but no `latest` (lost, or a crash between the first step and its pointer):
    --resume said 'no checkpoint yet' and started over, and so did a plain start, keeping the earlier
    run's step-4 beside the new run's (pruning keeps the newest numbers: the earlier run's)."""
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    (copy / "checkpoints" / "latest").unlink()
    values = write_config_values(run[1], copy)
    code = main(["train", str(write_config(tmp_path / "t.yaml", values)), *(["--resume"] if resume else [])])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err, err
    assert f"{copy / 'checkpoints'} holds complete checkpoints (step-2, step-4) but no latest file naming one" in err
    assert f"write step-4 into {copy / 'checkpoints' / 'latest'} and pass --resume; to start over, remove {copy / 'checkpoints'}" in err
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-2", "step-4"]  # nothing trained or written


@pytest.mark.parametrize("name", [checkpointing.TRAINER_STATE, checkpointing.OLD_TRAINER_STATE])
def test_a_trainer_state_of_a_newer_version_is_refused(capsys, tmp_path, run, name):
    """checkpoint.json's version was checked, the trainer state's not: a newer layout was resumed as if it were ours."""
    copy = damage(run[0], "train.yaml", 10**9, tmp_path)  # an intact copy
    step = copy / checkpointing.CHECKPOINTS / "step-4"
    newer = checkpointing.STATE_VERSION + 1
    if name == checkpointing.OLD_TRAINER_STATE:
        as_old_trainer_state(step, version=newer)
    else:
        path = step / name
        write_state(path, read_state(path), header={"format": checkpointing.STATE_FORMAT, "version": str(newer)})
    code = main(["train", str(write_config(tmp_path / "t.yaml", write_config_values(run[1], copy))), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"trainer state version {checkpointing.STATE_VERSION + 1} is not one this vlbridge reads" in err and "newer vlbridge" in err
